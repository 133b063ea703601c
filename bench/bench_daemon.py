"""
Daemon benchmark: a load generator over the real Unix socket of a real `rerankd run`.

    python bench/bench_daemon.py            # full run, about 4 minutes
    python bench/bench_daemon.py --quick    # about 1 minute
    python bench/bench_daemon.py --smoke    # 500 users, 1 s per cell: bench/run --quick's

What it measures, with the sequential model on (a SASRec model of 10,000 items, L =
50, d = 64, 2 blocks, random weights: latency does not depend on what it learned; one
encoder, or an ensemble with ``--members``; the online learning step with ``--online``)
and 500 candidates per rank request:

- rank latency p50/p99/p99.9 and throughput at 1, 8, 32 and 128 connections, each a
  closed loop (send, wait for the answer, send again), without and with a concurrent
  ingest stream of 10,000 events/s on its own connection;
- at 1 connection: users whose vector is cached, and users right after a new event
  of theirs (the vector is re-encoded on the request path);
- event-to-visible latency: from sending an event that makes a fresh item popular to
  the first rank answer, on another connection, that puts it first.

The load generator runs on the same 2 cores as the daemon, so its own CPU time
competes with the daemon's: the figures are what one machine does end to end.
Writes bench/out/daemon.json (or under ``$RERANKD_BENCH_OUT``, which ``bench/run --out``
sets), with the event-to-visible samples themselves (``samples_ms``), and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_ITEMS = 10_000
N_USERS = 2_000
N_CANDIDATES = 500
INGEST_RATE = 10_000  # events/s of the concurrent stream
_enc = msgspec.json.Encoder()


# ----------------------------------------------------------------------- set-up


def make_model(path: Path, members: int = 1) -> None:
    """A random SASRec model of N_ITEMS items (L = 50, d = 64, 2 blocks; ``members``)."""
    import jax  # noqa: PLC0415 - only the set-up needs JAX in this process

    from kernels.modelfile import save_model  # noqa: PLC0415
    from kernels.sasrec import SasrecConfig, init_params  # noqa: PLC0415

    config = SasrecConfig(num_items=N_ITEMS, max_len=50, dim=64, num_blocks=2, num_heads=1,
                          members=members)  # fmt: skip
    params = init_params(jax.random.key(0), config)
    save_model(path, params, config, vocabulary=[f"sku-{i}" for i in range(N_ITEMS)])


def start_daemon(tmp: Path, extra: str = "") -> tuple[subprocess.Popen[bytes], Path]:
    """`rerankd run` on a config in ``tmp`` (``extra``: more TOML), once it says READY=1."""
    sock = tmp / "rerankd.sock"
    (tmp / "rerankd.toml").write_text(
        f'[store]\ndata_dir = "{tmp / "data"}"\n'
        f'[server]\nsocket_path = "{sock}"\nmax_connections = 512\n'
        f'[ranking]\nmodel_path = "{tmp / "model.safetensors"}"\n'
        "batch_buckets = [1, 2, 4, 8, 16, 32, 64]\ncandidate_buckets = [512]\n" + extra
    )
    notify = tmp / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    env = os.environ | {"NOTIFY_SOCKET": str(notify), "PYTHONPATH": str(ROOT)}
    log = (tmp / "daemon.log").open("wb")
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "daemon.cli", "run", "--log-level", "warning",
         "--config", str(tmp / "rerankd.toml")],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    listener.settimeout(300)
    while b"READY=1" not in listener.recv(4096):
        pass
    listener.close()
    return proc, sock


# ------------------------------------------------------------------- the client


class Conn:
    """One pipelining-capable connection (used here one request at a time)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.n = reader, writer, 0

    @classmethod
    async def open(cls, path: Path) -> Conn:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
        return cls(reader, writer)

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self.n += 1
        self.writer.write(_enc.encode({"id": self.n, "op": op, **fields}) + b"\n")
        answer = msgspec.json.decode(await self.reader.readline())
        if not answer.get("ok"):
            msg = f"{op}: {answer}"
            raise RuntimeError(msg)
        return answer  # type: ignore[no-any-return]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def _event(n: int, user: str, item: str, kind: str = "view") -> dict[str, Any]:
    return {"id": f"b-{n}", "type": kind, "user": user, "item": item, "ts": time.time() - 1}


async def populate(path: Path, rng: np.random.Generator, users: int = N_USERS) -> None:
    """``users`` users with 30 views each, in batches of 1000."""
    conn = await Conn.open(path)
    events = [_event(k, f"user-{k % users}", f"sku-{int(rng.integers(N_ITEMS))}")
              for k in range(users * 30)]  # fmt: skip
    for start in range(0, len(events), 1000):
        await conn.call("ingest", events=events[start : start + 1000])
    await conn.close()


# -------------------------------------------------------------------- workloads


async def closed_loop(
    path: Path, connections: int, seconds: float, users: list[str], rng: np.random.Generator
) -> dict[str, Any]:
    """Rank latencies of ``connections`` closed loops for ``seconds``."""
    conns = [await Conn.open(path) for _ in range(connections)]
    cands = [f"sku-{i}" for i in rng.choice(N_ITEMS, N_CANDIDATES, replace=False)]
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def loop(conn: Conn, k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await conn.call("rank", user=users[i % len(users)], candidates=cands, k=20)
            latencies.append(time.perf_counter() - started)
            i += connections

    wall = time.perf_counter()
    await asyncio.gather(*(loop(c, k) for k, c in enumerate(conns)))
    wall = time.perf_counter() - wall
    for c in conns:
        await c.close()
    return summarize(latencies, wall)


async def warm_every_user(path: Path, users: list[str]) -> dict[str, Any]:
    """Rank once for every user, so that the measured loops find their vectors cached."""
    conn = await Conn.open(path)
    cands = [f"sku-{i}" for i in range(N_CANDIDATES)]
    started = time.perf_counter()
    for user in users:
        await conn.call("rank", user=user, candidates=cands, k=20)
    await conn.close()
    return {"users": len(users), "seconds": round(time.perf_counter() - started, 2)}


async def ingest_stream(path: Path, stop: asyncio.Event, counter: list[int]) -> None:
    """INGEST_RATE events/s in batches of 100 every 10 ms, on its own connection."""
    conn = await Conn.open(path)
    n = 10_000_000
    next_at = time.perf_counter()
    while not stop.is_set():
        batch = [_event(n + j, f"user-{(n + j) % N_USERS}", f"sku-{(n * 7 + j) % N_ITEMS}")
                 for j in range(INGEST_RATE // 100)]  # fmt: skip
        n += len(batch)
        await conn.call("ingest", events=batch)
        counter[0] += len(batch)
        next_at += 0.01
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    await conn.close()


async def after_new_event(path: Path, rounds: int) -> dict[str, Any]:
    """Rank latency right after the user's own new event (the vector is re-encoded)."""
    conn = await Conn.open(path)
    cands = [f"sku-{i}" for i in range(N_CANDIDATES)]
    latencies = []
    for r in range(rounds):
        user = f"user-{r % N_USERS}"
        await conn.call("ingest", events=[_event(20_000_000 + r, user, f"sku-{r % N_ITEMS}")])
        started = time.perf_counter()
        await conn.call("rank", user=user, candidates=cands, k=20)
        latencies.append(time.perf_counter() - started)
    await conn.close()
    return summarize(latencies, None)


async def event_to_visible(path: Path, rounds: int) -> dict[str, Any]:
    """From sending a purchase of a fresh item to a rank (other connection) showing it first."""
    writer, reader = await Conn.open(path), await Conn.open(path)
    delays = []
    for r in range(rounds):
        fresh = f"fresh-{r}"
        sent = time.perf_counter()
        ack = asyncio.create_task(
            writer.call("ingest", events=[_event(30_000_000 + r, "buyer", fresh, "purchase")])
        )
        while True:
            ranked = await reader.call("rank", user="viewer", candidates=["never-seen", fresh])
            if ranked["items"][0] == fresh:
                delays.append(time.perf_counter() - sent)
                break
        await ack
    for c in (writer, reader):
        await c.close()
    return summarize(delays, None, keep=True)


def summarize(samples: list[float], wall: float | None, *, keep: bool = False) -> dict[str, Any]:
    """Percentiles in ms (and the rate over ``wall``); ``keep``: the samples too, in ms."""
    a = np.asarray(samples) * 1e3
    out: dict[str, Any] = {
        "n": len(a),
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "p999_ms": round(float(np.percentile(a, 99.9)), 3),
    }
    if wall:
        out["per_s"] = round(len(a) / wall, 1)
    if keep:
        out["samples_ms"] = [round(float(x), 3) for x in a]
    return out


# ------------------------------------------------------------------------- main


#: (seconds per cell, users, rounds after a new event, event-to-visible probes) per mode
SIZES = {"full": (10.0, N_USERS, 1000, 500), "quick": (3.0, N_USERS, 200, 100),
         "smoke": (1.0, 500, 50, 50)}  # fmt: skip


async def run_all(path: Path, mode: str) -> dict[str, Any]:
    seconds, n_users, after_rounds, probes = SIZES[mode]
    rng = np.random.default_rng(0)
    await populate(path, rng, n_users)
    users = [f"user-{k}" for k in range(n_users)]
    results: dict[str, Any] = {"rank": {}, "rank_with_ingest": {}}
    results["warm_up"] = await warm_every_user(path, users)
    for c in (1, 8, 32, 128):
        results["rank"][c] = await closed_loop(path, c, seconds, users, rng)
        print(f"rank, {c:>3} connections: {results['rank'][c]}", flush=True)
    for c in (1, 8, 32, 128):
        stop, counter = asyncio.Event(), [0]
        stream = asyncio.create_task(ingest_stream(path, stop, counter))
        started = time.perf_counter()
        figures = await closed_loop(path, c, seconds, users, rng)
        stop.set()
        await stream
        figures["ingested_per_s"] = round(counter[0] / (time.perf_counter() - started), 1)
        results["rank_with_ingest"][c] = figures
        print(f"rank + ingest, {c:>3} connections: {figures}", flush=True)
    results["cached_1_connection"] = results["rank"][1]
    results["after_new_event"] = await after_new_event(path, after_rounds)
    print(f"rank right after the user's event: {results['after_new_event']}", flush=True)
    results["event_to_visible"] = await event_to_visible(path, probes)
    print(f"event to visible: {_brief(results['event_to_visible'])}", flush=True)
    return results


def _brief(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if k != "samples_ms"}


def verdicts(r: dict[str, Any]) -> list[dict[str, str]]:
    checks = [
        ("p99 <= 1 ms at 1 connection, cached vector", r["rank"][1]["p99_ms"], 1.0, "le"),
        ("p99 <= 2 ms right after the user's new event", r["after_new_event"]["p99_ms"], 2.0, "le"),
        (">= 5,000 rank/s at 32 connections", r["rank"][32]["per_s"], 5000.0, "ge"),
        ("event visible to rank within 10 ms p99", r["event_to_visible"]["p99_ms"], 10.0, "le"),
    ]  # fmt: skip
    return judge(checks)


def judge(checks: list[tuple[str, float, float, str]]) -> list[dict[str, str]]:
    """Each ``(target, measured, bound, "le" | "ge")`` as MET or MISSED."""
    out = []
    for name, value, bound, how in checks:
        met = value <= bound if how == "le" else value >= bound
        out.append({"target": name, "measured": str(value), "verdict": "MET" if met else "MISSED"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--quick", action="store_true", help="3 s per cell instead of 10 s")
    parser.add_argument("--smoke", action="store_true",
                        help="500 users, 1 s per cell, 50 probes: checks that it runs")
    parser.add_argument("--members", type=int, default=1,
                        help="serve an ensemble of this many encoders (rerankd train's default "
                             "is 3; the targets were set for one)")  # fmt: skip
    parser.add_argument("--online", action="store_true",
                        help="with the online learning step on ([online].enabled, its "
                             "default rates): what it costs the request path")  # fmt: skip
    args = parser.parse_args()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        make_model(tmp / "model.safetensors", args.members)
        proc, path = start_daemon(tmp, "[online]\nenabled = true\n" if args.online else "")
        try:
            results = asyncio.run(run_all(path, mode))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    results["members"] = args.members
    results["online"] = args.online
    results["targets"] = verdicts(results)
    write_results(results, "daemon", quick=args.quick, smoke=args.smoke)


def out_dir() -> Path:
    """Where the figures go: ``$RERANKD_BENCH_OUT`` (``bench/run --out``) or bench/out."""
    return Path(os.environ.get("RERANKD_BENCH_OUT") or ROOT / "bench" / "out")


def git_commit() -> str:
    """The checkout's HEAD ("" outside a checkout)."""
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT,  # noqa: S607
                          capture_output=True, text=True, check=False).stdout.strip()


def write_results(results: dict[str, Any], name: str, *, quick: bool, smoke: bool = False,
                  commit: str | None = None) -> None:  # fmt: skip
    """
    Add the machine, print the verdicts, write ``<out_dir()>/<name>.json``.

    ``commit``: the one the measured code came from, taken when the run started (a long
    run outlives commits made meanwhile); by default HEAD now.
    """
    results["machine"] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "python": platform.python_version(), "quick": quick, "smoke": smoke,
        "git_commit": git_commit() if commit is None else commit,
    }  # fmt: skip
    for t in results["targets"]:
        print(f"{t['verdict']:>6}  {t['target']}: {t['measured']}")
    out = out_dir() / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
