"""
Event-store benchmark: decode, durable append, fold, the ingest pipeline, replay, memory.

    python bench/bench_eventstore.py            # full run, about 3-5 minutes
    python bench/bench_eventstore.py --quick    # about 30 s, smaller samples
    python bench/bench_eventstore.py --smoke    # one small sample of each (bench/run --quick)
    python bench/bench_eventstore.py --profile  # also cProfile the single-thread pipeline

Prints every figure and a markdown table, and writes them to bench/out/eventstore.json
(``$RERANKD_BENCH_OUT`` instead of bench/out when set, as ``bench/run --out`` does).
The 1M-event replay log is generated once (``synchronous=OFF``) into
bench/out/replay-1m/ and reused while its generator version matches (the smaller logs of
``--quick`` and ``--smoke`` likewise).

Workload: a catalogue of 20k items (item events, 60% with a category, 20 categories),
then interactions of 30k users with a skewed (power-law-like) choice of users and
items: view 45%, click 18%, skip 6%, cart 5%, impression 8% (10 items shown), like 3%,
rating 3%, purchase 2%, dislike 1%, item updates 2%; 40% of the events carry a context,
20% a ranking id. Event ids are random 128-bit hex (like UUIDs); user ids are 32 hex
characters (a truncated HMAC, as the pseudonymizing privacy plugin would produce);
item ids "sku-<n>". The catalogue is loaded (untimed) before the timed events.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
import io
import json
import logging
import os
import platform
import pstats
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import structlog

from eventstore import (
    AppendResult,
    Event,
    EventDecoder,
    EventLog,
    FoldConfig,
    GroupCommitter,
    State,
    Store,
    project,
)
from eventstore.log import Synchronous

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("RERANKD_BENCH_OUT") or ROOT / "bench" / "out")
REPLAY_DIR = OUT / "replay-1m"
GENERATOR_VERSION = "1"  # bump when the workload changes, to regenerate the cached log
USERS = 30_000
ITEMS = 20_000
CATEGORIES = 20
BATCH = 1000
CONFIG = FoldConfig()  # L = 50: the figures are for the default sequence length

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


# --- workload ------------------------------------------------------------------------

class Workload:
    """A deterministic stream of realistic events (as JSON-ready dicts)."""

    _KINDS = (("view", 45), ("click", 18), ("skip", 6), ("cart", 5), ("impression", 8),
              ("like", 3), ("rating", 3), ("purchase", 2), ("dislike", 1), ("item", 2))

    def __init__(self, seed: int = 1, *, users: int = USERS, items: int = ITEMS) -> None:
        self.rng = random.Random(seed)
        self.users = [f"{self.rng.getrandbits(128):032x}" for _ in range(users)]
        self.items = [f"sku-{n}" for n in range(items)]
        kinds = [k for k, w in self._KINDS for _ in range(w)]
        self.kinds = kinds
        self.t = time.time() - 30 * 86_400.0
        self.devices = ("ios", "android", "web")
        self.pages = ("home", "search", "pdp", "cart", "feed")

    def _id(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def _item(self) -> str:
        return self.items[int(len(self.items) * self.rng.random() ** 2)]

    def _user(self) -> str:
        return self.users[int(len(self.users) * self.rng.random() ** 1.5)]

    def item_event(self, item: str) -> dict[str, Any]:
        rng = self.rng
        fields: dict[str, Any] = {"price": round(rng.uniform(1, 500), 2),
                                  "available": rng.random() < 0.95, "title": f"Product {item}",
                                  "tags": ["new", "sale"][: rng.randint(0, 2)]}
        if rng.random() < 0.6:
            fields["category"] = f"cat-{rng.randrange(CATEGORIES)}"
        self.t += 0.01
        return {"id": self._id(), "type": "item", "item": item, "ts": self.t, "fields": fields}

    def catalogue(self) -> Iterator[dict[str, Any]]:
        for item in self.items:
            yield self.item_event(item)

    def interaction(self) -> dict[str, Any]:
        rng = self.rng
        kind = rng.choice(self.kinds)
        self.t += 0.05
        if kind == "item":
            return self.item_event(self._item())
        event: dict[str, Any] = {"id": self._id(), "type": kind, "user": self._user(),
                                 "ts": round(self.t + rng.uniform(-2.0, 0.0), 3)}
        if kind == "impression":
            event["items"] = [self._item() for _ in range(10)]
        else:
            event["item"] = self._item()
        if kind == "rating":
            event["value"] = float(rng.randint(1, 5))
        elif kind == "view" and rng.random() < 0.5:
            event["value"] = round(rng.uniform(1, 120), 1)
        if rng.random() < 0.2:
            event["ranking_id"] = f"r-{self._id()[:16]}"
        if rng.random() < 0.4:
            event["context"] = {"device": rng.choice(self.devices), "page": rng.choice(self.pages),
                                "position": rng.randint(0, 49)}
        return event

    def raw_batches(self, n_events: int, size: int = BATCH) -> list[bytes]:
        """``n_events`` interactions as JSON list bytes of ``size`` events each."""
        return [msgspec.json.encode([self.interaction() for _ in range(min(size, n_events - k))])
                for k in range(0, n_events, size)]

    def catalogue_batches(self, size: int = BATCH) -> list[bytes]:
        items = list(self.catalogue())
        return [msgspec.json.encode(items[k:k + size]) for k in range(0, len(items), size)]


def decode_all(raws: list[bytes], decoder: EventDecoder | None = None) -> list[list[Event]]:
    decoder = decoder or EventDecoder()
    out = []
    for raw in raws:
        result = decoder.decode(raw)
        assert not result.rejected, result.rejected[:1]
        out.append(result.events)
    return out


# --- measuring helpers ---------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p99": pct(values, 99), "min": min(values),
            "max": max(values), "n": len(values)}


def say(text: str) -> None:
    print(text, flush=True)


def fresh_dir(name: str) -> Path:
    path = OUT / "tmp" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def store_with_catalogue(path: Path, catalogue: list[list[Event]], **kwargs: Any) -> Store:
    store = Store(path, fold=CONFIG, snapshot_every=0, **kwargs)
    for events in catalogue:
        store.append(events)
    return store


# --- the measurements ----------------------------------------------------------------

def bench_decode(work: Workload, lists: int, singles: int, repeats: int) -> dict[str, Any]:
    raws = work.raw_batches(lists * BATCH)
    decoder = EventDecoder()
    list_s: list[float] = []
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for raw in raws:
            t = time.perf_counter()
            decoder.decode(raw)
            list_s.append(time.perf_counter() - t)
        rates.append(lists * BATCH / (time.perf_counter() - t0))
    one = [msgspec.json.encode(work.interaction()) for _ in range(singles)]
    decode_one = decoder.decode_one
    one_rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for raw in one:
            decode_one(raw)
        one_rates.append(singles / (time.perf_counter() - t0))
    per_call = []
    clock = time.perf_counter_ns
    for raw in one:
        t = clock()
        decode_one(raw)
        per_call.append((clock() - t) / 1000)
    return {
        "list_events_per_s": summary(rates),
        "list_ms_per_1000": summary([s * 1e3 for s in list_s]),
        "bytes_per_event": round(sum(map(len, raws)) / (lists * BATCH), 1),
        "one_events_per_s": summary(one_rates),
        "one_us_per_call": summary(per_call),
    }


def bench_append(work: Workload, sizes: dict[int, int], repeats: int) -> dict[str, Any]:
    """
    EventLog.append with synchronous=FULL per batch size, 1000 also with OFF for
    comparison; each repeat into a new, empty log (a large log: bench_append_large).
    """
    out: dict[str, Any] = {}
    runs: list[tuple[int, int, Synchronous]] = [(k, v, "FULL") for k, v in sizes.items()]
    runs.append((1000, sizes[1000], "OFF"))
    for size, batches, sync in runs:
        lat: list[float] = []
        rates = []
        for r in range(repeats):
            log = EventLog(fresh_dir(f"append-{size}-{sync}-{r}") / "events.db", synchronous=sync)
            groups = decode_all(work.raw_batches(size * batches, size))
            t0 = time.perf_counter()
            for events in groups:
                t = time.perf_counter()
                log.append(events, positions={("kafka:events", "0"): 1})
                lat.append(time.perf_counter() - t)
            rates.append(size * batches / (time.perf_counter() - t0))
            log.close()
        out[str(size) if sync == "FULL" else f"{size}, synchronous={sync}"] = {
            "events_per_s": summary(rates),
                          "commit_ms": summary([s * 1e3 for s in lat])}
    return out


def bench_fold(work: Workload, catalogue: list[list[Event]], n: int, repeats: int
               ) -> dict[str, Any]:
    events = [e for batch in decode_all(work.raw_batches(n)) for e in batch]
    rates = []
    for _ in range(repeats):
        state = State(CONFIG)
        for batch in catalogue:
            project(state, batch)
        gc.collect()
        t0 = time.perf_counter()
        project(state, events)
        rates.append(n / (time.perf_counter() - t0))
    return {"events_per_s": summary(rates), "users": state.n_users, "items": state.n_items}


def run_pipeline(raws: list[bytes], catalogue: list[list[Event]], name: str
                 ) -> tuple[float, list[float]]:
    """raw JSON -> decode -> Store.append (durable + fold), one thread: (events/s, batch s)."""
    store = store_with_catalogue(fresh_dir(name), catalogue)
    decoder = store.decoder
    n = 0
    lat = []
    gc.collect()
    t0 = time.perf_counter()
    for k, raw in enumerate(raws):
        t = time.perf_counter()
        decoded = decoder.decode(raw)
        n += store.append(decoded.events, positions={("kafka:events", "0"): k + 1}).accepted
        lat.append(time.perf_counter() - t)
    rate = n / (time.perf_counter() - t0)
    store.close(snapshot=False)
    return rate, lat


def bench_pipeline(work: Workload, catalogue: list[list[Event]], n: int, repeats: int,
                   size: int = BATCH) -> dict[str, Any]:
    rates = []
    lat: list[float] = []
    for r in range(repeats):
        rate, batch_s = run_pipeline(work.raw_batches(n, size), catalogue,
                                     f"pipeline-{size}-{r}")
        rates.append(rate)
        lat += batch_s
    return {"events_per_s": summary(rates), "batch_ms": summary([s * 1e3 for s in lat])}


def _produce(committer: GroupCommitter, p: int, raws: list[bytes], window: int,
             latencies: list[float]) -> None:
    """One producer: decode, submit, keep ``window`` requests in flight, await each ack."""
    decoder = EventDecoder()
    inflight: list[tuple[float, Future[AppendResult]]] = []
    for k, raw in enumerate(raws):
        events = decoder.decode(raw).events
        t = time.perf_counter()
        inflight.append((t, committer.submit(events, positions={("kafka:e", str(p)): k},
                                             block=True)))
        if len(inflight) >= window:
            t, fut = inflight.pop(0)
            fut.result()
            latencies.append(time.perf_counter() - t)
    for t, fut in inflight:
        fut.result()
        latencies.append(time.perf_counter() - t)


def bench_group_commit(work: Workload, catalogue: list[list[Event]], n: int, *, producers: int,
                       size: int, window: int, repeats: int) -> dict[str, Any]:
    """
    Producers (threads) decode raw JSON and submit to one GroupCommitter whose sink is
    Store.append; each keeps ``window`` requests in flight and waits for their futures
    (an acknowledgement would be sent then).
    """
    rates = []
    lat: list[float] = []
    group_sizes = []
    for r in range(repeats):
        raws = work.raw_batches(n, size)
        store = store_with_catalogue(fresh_dir(f"group-{r}"), catalogue)
        committer = GroupCommitter(store.append, max_events=5000)
        shares = [raws[p::producers] for p in range(producers)]
        results: list[list[float]] = [[] for _ in range(producers)]
        threads = [threading.Thread(target=_produce, args=(committer, p, shares[p], window,
                                                           results[p]))
                   for p in range(producers)]
        gc.collect()
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        rates.append(n / (time.perf_counter() - t0))
        lat += [x for mine in results for x in mine]
        group_sizes.append(n / max(committer.groups, 1))
        committer.close()
        store.close(snapshot=False)
    return {"events_per_s": summary(rates), "ack_ms": summary([s * 1e3 for s in lat]),
            "events_per_group": statistics.median(group_sizes), "producers": producers,
            "request_events": size, "window": window}


def replay_log(n: int) -> Path:
    """The cached log of ``n`` events (catalogue first), generated with synchronous=OFF."""
    directory = REPLAY_DIR if n == 1_000_000 else OUT / f"replay-{n}"
    marker = directory / "generator.json"
    want = {"version": GENERATOR_VERSION, "events": n}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    say(f"  generating the {n:,}-event replay log in {directory} (once) ...")
    t0 = time.perf_counter()
    work = Workload(seed=7)
    log = EventLog(directory / "events.db", synchronous="OFF")
    decoder = EventDecoder()
    done = 0
    for raw in work.catalogue_batches():
        done += log.append(decoder.decode(raw).events).accepted
    while done < n:
        raw = msgspec.json.encode([work.interaction() for _ in range(min(BATCH, n - done))])
        done += log.append(decoder.decode(raw).events).accepted
    log.close()
    marker.write_text(json.dumps(want))
    say(f"  generated in {time.perf_counter() - t0:.1f} s")
    return directory


def bench_replay(n: int, repeats: int) -> dict[str, Any]:
    directory = replay_log(n)
    store_s = []
    project_s = []
    for _ in range(repeats):
        shutil.rmtree(directory / "snapshots", ignore_errors=True)
        gc.collect()
        t0 = time.perf_counter()
        store = Store(directory, fold=CONFIG, snapshot_every=0)  # no snapshot: replays it all
        store_s.append(time.perf_counter() - t0)
        users, offset = store.state.n_users, store.state.offset
        store.close(snapshot=False)
        log = EventLog(directory / "events.db")
        gc.collect()
        t0 = time.perf_counter()
        state = project(State(CONFIG), (e for _, e in log.read()))
        project_s.append(time.perf_counter() - t0)
        log.close()
        assert state.n_users == users
    state.offset = offset
    t0 = time.perf_counter()
    path = store.snapshots.write(state)
    snap_s = time.perf_counter() - t0
    snap_bytes = path.stat().st_size
    shutil.rmtree(directory / "snapshots", ignore_errors=True)
    return {"events": n, "store_open_s": summary(store_s), "project_read_s": summary(project_s),
            "users": users, "items": state.n_items, "last_offset": offset,
            "snapshot_write_s": snap_s, "snapshot_bytes": snap_bytes}


def bench_append_large(work: Workload, n: int, batches: int, repeats: int) -> dict[str, Any]:
    """
    EventLog.append (FULL, 1000-event batches) into a copy of the n-event replay log,
    with random ids. The id index is built before timing (as Store does on open).
    """
    path = fresh_dir("append-large") / "events.db"
    shutil.copyfile(replay_log(n) / "events.db", path)
    log = EventLog(path, synchronous="FULL")
    log.prepare_writes()
    lat: list[float] = []
    rates = []
    for _ in range(repeats):
        groups = decode_all(work.raw_batches(BATCH * batches))
        t0 = time.perf_counter()
        for events in groups:
            t = time.perf_counter()
            log.append(events, positions={("kafka:events", "0"): 1})
            lat.append(time.perf_counter() - t)
        rates.append(BATCH * batches / (time.perf_counter() - t0))
    log.close()
    return {"log_events": n, "events_per_s": summary(rates),
            "commit_ms": summary([s * 1e3 for s in lat])}


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _new_users_raw(n: int) -> list[bytes]:
    """``n`` clicks of ``n`` distinct users on 1000 items, as JSON lists of 1000."""
    rng = random.Random(3)
    return [msgspec.json.encode([
        {"id": f"m{k}", "type": "click", "user": f"{rng.getrandbits(128):032x}",
         "item": f"sku-{k % 1000}", "ts": 1.7e9} for k in range(j, min(j + BATCH, n))])
        for j in range(0, n, BATCH)]


def _fold_raw(state: State, raws: list[bytes]) -> None:
    decoder = EventDecoder()
    for raw in raws:
        project(state, decoder.decode(raw).events)  # the events die here, the state's ids stay


def bench_memory(n: int) -> dict[str, Any]:
    """
    Array bytes per user, and measured bytes per user (arrays + id maps) over ``n`` new
    users. The events are decoded inside the measured region and dropped after folding,
    so what stays allocated is the state's: arrays, id strings, dict and list entries.
    """
    per_user_arrays = State(CONFIG).bytes_per_user()
    raws = _new_users_raw(n)
    state = State(CONFIG)
    _fold_raw(state, raws[:1])  # the 1000 items and the first 1000 users exist before measuring
    first = state.n_users
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    _fold_raw(state, raws[1:])
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    added = state.n_users - first
    capacity = state._user_cap  # noqa: SLF001 - the benchmark reports growth slack
    arrays_alloc = per_user_arrays * (capacity - 1024)  # arrays grown beyond the first 1024
    # RSS in a fresh process: here the allocator would reuse what the tracing run freed
    probe = subprocess.run([sys.executable, __file__, "--rss-probe", str(n)],  # noqa: S603
                           check=True, capture_output=True, text=True)
    rss = json.loads(probe.stdout.strip().splitlines()[-1])["rss_delta"]
    id_maps = (traced - arrays_alloc) / added
    return {
        "seq_len": CONFIG.seq_len, "users": n, "user_capacity": capacity,
        "array_bytes_per_user": per_user_arrays,
        "traced_bytes_per_user": traced / added,
        "traced_id_maps_bytes_per_user": id_maps,
        "traced_bytes_per_user_at_full_capacity": per_user_arrays + id_maps,
        "rss_bytes_per_user": rss / n,
        "user_id_chars": 32,
    }


def rss_probe(n: int) -> None:
    """In a fresh process: the RSS growth from folding ``n`` new users (printed as JSON)."""
    raws = _new_users_raw(n)
    state = State(CONFIG)
    gc.collect()
    rss0 = _rss()
    _fold_raw(state, raws)
    gc.collect()
    print(json.dumps({"rss_delta": _rss() - rss0, "users": state.n_users}))


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip()
                  for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT,  # noqa: S603, S607 - git on PATH
                                  capture_output=True, text=True, check=True)
            return done.stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    dirty = git("status", "--porcelain", "--", "eventstore")
    return {
        "cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version, "numpy": np.__version__, "msgspec": msgspec.__version__,
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD") + (" (eventstore/ modified)" if dirty else ""),
    }


# --- report ----------------------------------------------------------------------------

def fmt(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def table(r: dict[str, Any], *, quick: bool) -> str:
    m = r["machine"]
    rows: list[tuple[str, str, str]] = []

    def row(name: str, s: dict[str, float] | float, unit: str, *, p99: bool = True) -> None:
        if isinstance(s, dict):
            rows.append((name, f"{fmt(s['median'])} {unit}",
                         f"{fmt(s['p99'])} {unit}" if p99 else "-"))
        else:
            rows.append((name, f"{fmt(s)} {unit}", "-"))

    d = r["decode"]
    row("decode+validate, lists of 1000 (events/s)", d["list_events_per_s"], "ev/s", p99=False)
    row("  per 1000-event list", d["list_ms_per_1000"], "ms")
    row("decode_one (events/s)", d["one_events_per_s"], "ev/s", p99=False)
    row("  per call (incl. ~0.05 µs timer)", d["one_us_per_call"], "µs")
    for size, a in r["append"].items():
        what = f"batch {size}" if size.isdigit() else f"batch {size} (no fsync: comparison only)"
        row(f"EventLog.append FULL, {what} (events/s)" if size.isdigit() else
            f"EventLog.append, {what} (events/s)", a["events_per_s"], "ev/s", p99=False)
        row(f"  commit latency, batch {size}", a["commit_ms"], "ms")
    al = r["append_large"]
    row(f"EventLog.append FULL, batch 1000, into a log of {al['log_events']:,} events "
        "(events/s)", al["events_per_s"], "ev/s", p99=False)
    row("  commit latency, batch 1000, large log", al["commit_ms"], "ms")
    f = r["fold"]
    row(f"fold `project` ({f['users']:,} users, {f['items']:,} items)", f["events_per_s"],
        "ev/s", p99=False)
    p = r["pipeline"]
    row("pipeline 1 thread: JSON->decode->Store.append, batch 1000", p["events_per_s"], "ev/s",
        p99=False)
    row("  per batch (decode+commit+fold)", p["batch_ms"], "ms")
    p5 = r["pipeline_5000"]
    row("pipeline 1 thread, groups of 5000 (the GroupCommitter's maximum)", p5["events_per_s"],
        "ev/s", p99=False)
    row("  per group of 5000 (decode+commit+fold)", p5["batch_ms"], "ms")
    for key, g in r["group_commit"].items():
        row(f"pipeline via GroupCommitter, {g['producers']} producer threads x {key} "
            f"(2 cores)", g["events_per_s"], "ev/s", p99=False)
        row(f"  submit->ack latency ({fmt(g['events_per_group'])} events/group)", g["ack_ms"],
            "ms")
    rp = r["replay"]
    label = f"{rp['events']:,}" + ("" if rp["events"] == 1_000_000 else " (x scaled to 1M below)")
    row(f"replay {label}: Store(dir) open, no snapshot", rp["store_open_s"], "s")
    row(f"replay {label}: project(log.read())", rp["project_read_s"], "s")
    row(f"snapshot write ({rp['users']:,} users, {rp['snapshot_bytes'] / 1e6:.1f} MB)",
        rp["snapshot_write_s"], "s")
    mem = r["memory"]
    row("state bytes/user, arrays (`bytes_per_user`, L=50)", mem["array_bytes_per_user"], "B")
    row(f"state bytes/user measured, tracemalloc over {mem['users']:,} users (+slack)",
        mem["traced_bytes_per_user"], "B")
    row("  of which id maps (32-char ids) per user", mem["traced_id_maps_bytes_per_user"], "B")
    row("  arrays + id maps, no growth slack", mem["traced_bytes_per_user_at_full_capacity"], "B")
    row(f"state bytes/user measured, RSS delta over {mem['users']:,} users (+slack)",
        mem["rss_bytes_per_user"], "B")
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, SQLite {m['sqlite']}, "
           f"numpy {m['numpy']}, msgspec {m['msgspec']}; {m['date']}; commit {m['git_commit']}"
           + (" (--smoke)" if r.get("smoke") else " (--quick)" if quick else ""), "",
           "| measurement | median | p99 |", "|---|---:|---:|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    out += ["", "| target | measured | |", "|---|---:|---|"]
    out += [f"| {t['target']} | {t['measured']} | {'met' if t['met'] else 'MISSED'} |"
            for t in r["targets"]]
    return "\n".join(out)


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    rate = r["pipeline"]["events_per_s"]["median"]
    rate5 = r["pipeline_5000"]["events_per_s"]["median"]
    rp = r["replay"]
    replay_1m = rp["store_open_s"]["median"] * 1_000_000 / rp["events"]
    stream_1m = rp["project_read_s"]["median"] * 1_000_000 / rp["events"]
    mem = r["memory"]
    return [
        {"target": ">= 100,000 events/s decode+append+fold (1 thread, batches of 1000)",
         "measured": f"{rate:,.0f} ev/s", "met": rate >= 100_000},
        {"target": ">= 100,000 events/s decode+append+fold (1 thread, groups of 5000)",
         "measured": f"{rate5:,.0f} ev/s", "met": rate5 >= 100_000},
        {"target": "1M-event replay <= 10 s, Store(dir) open" + (
            "" if rp["events"] == 1_000_000 else " (scaled)"),
         "measured": f"{replay_1m:.2f} s", "met": replay_1m <= 10},
        {"target": "1M-event replay <= 10 s, streaming project(log.read())" + (
            "" if rp["events"] == 1_000_000 else " (scaled)"),
         "measured": f"{stream_1m:.2f} s", "met": stream_1m <= 10},
        {"target": "< 1024 B state/user (arrays)", "measured":
         f"{mem['array_bytes_per_user']} B", "met": mem["array_bytes_per_user"] < 1024},
        {"target": "< 1024 B state/user (arrays + id maps, measured)", "measured":
         f"{mem['traced_bytes_per_user_at_full_capacity']:.0f} B",
         "met": mem["traced_bytes_per_user_at_full_capacity"] < 1024},
    ]


def profile_pipeline(catalogue: list[list[Event]], n: int) -> str:
    raws = Workload(seed=11).raw_batches(n)
    prof = cProfile.Profile()
    prof.enable()
    run_pipeline(raws, catalogue, "profile")
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller samples, about 30 s")
    parser.add_argument("--smoke", action="store_true",
                        help="one small sample of each, about 10 s: checks that it runs")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the single-thread pipeline and print the top functions")
    parser.add_argument("--rss-probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_probe:
        rss_probe(args.rss_probe)
        return
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    q = mode != "full"

    def pick(full: Any, quick: Any, smoke: Any) -> Any:
        return {"full": full, "quick": quick, "smoke": smoke}[mode]

    started = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    work = Workload(seed=1)
    catalogue = decode_all(work.catalogue_batches())
    r: dict[str, Any] = {"machine": machine(), "quick": q, "smoke": args.smoke}
    replay_n = pick(1_000_000, 200_000, 50_000)
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("decode", lambda: bench_decode(work, pick(100, 20, 5), pick(100_000, 20_000, 5_000),
                                        pick(7, 3, 1))),
        ("append", lambda: bench_append(work, pick({1: 500, 100: 200, 1000: 40},
                                                   {1: 100, 100: 50, 1000: 10},
                                                   {1: 30, 100: 10, 1000: 5}), pick(5, 3, 1))),
        ("fold", lambda: bench_fold(work, catalogue, pick(300_000, 50_000, 20_000),
                                    pick(5, 3, 1))),
        ("pipeline", lambda: bench_pipeline(work, catalogue, pick(200_000, 50_000, 20_000),
                                            pick(5, 3, 1))),
        ("pipeline_5000", lambda: bench_pipeline(work, catalogue, pick(200_000, 50_000, 20_000),
                                                 pick(5, 3, 1), size=5000)),
        ("group_commit", lambda: {
            "1000-event requests": bench_group_commit(
                work, catalogue, pick(200_000, 50_000, 20_000), producers=4, size=1000,
                window=2, repeats=pick(3, 2, 1)),
            "10-event requests": bench_group_commit(
                work, catalogue, pick(50_000, 10_000, 5_000), producers=8, size=10, window=1,
                repeats=pick(3, 2, 1))}),
        ("replay", lambda: bench_replay(replay_n, pick(3, 1, 1))),
        ("append_large", lambda: bench_append_large(work, replay_n, pick(20, 10, 5),
                                                    pick(3, 2, 1))),
        ("memory", lambda: bench_memory(pick(100_000, 20_000, 20_000))),
    ]
    for name, step in steps:
        t0 = time.perf_counter()
        r[name] = step()
        say(f"{name} ({time.perf_counter() - t0:.1f} s): {json.dumps(r[name], default=str)}")
    r["targets"] = targets(r)
    if args.profile:
        r["profile"] = profile_pipeline(catalogue, 50_000 if q else 100_000)
        say(r["profile"])
    shutil.rmtree(OUT / "tmp", ignore_errors=True)
    r["seconds"] = round(time.perf_counter() - started, 1)
    (OUT / "eventstore.json").write_text(json.dumps(r, indent=2, default=str) + "\n")
    say("")
    say(table(r, quick=q))
    say(f"\n{r['seconds']} s; figures in {OUT / 'eventstore.json'}")


if __name__ == "__main__":
    main()
