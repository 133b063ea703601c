"""
Kernel benchmark: latency of the serving path, rerankd against plain numpy and PyTorch.

    python3 bench/bench_kernels.py                 # full run, about 3-5 minutes
    python3 bench/bench_kernels.py --quick         # N = 500, B in {1, 64}, ~10x fewer calls
    python3 bench/bench_kernels.py --smoke         # N = 500, B in {1, 16, 64}, one short round
    python3 bench/bench_kernels.py --device gpu    # rerankd (and torch) on the accelerator
    python3 bench/bench_kernels.py --profile       # also cProfile rerankd's B = 1 score call
    bench/setup-torch-env                          # once: bench/.venv with torch (baseline)

Model: the SASRec encoder of `kernels.sasrec` with L = 50, d = 64, 2 blocks, 1 head and
50,000 items (``init_params(key(0))``, biases and layer-norm parameters perturbed so
that they matter); candidates are scored by dot product plus 3 fused feature columns
(popularity, freshness, bias) with fixed weights, and the top 20 are returned.

Measured, for N = 100, 500, 2000 candidates and B = 1, 16, 64 users per call:

- *score*: score + top-k alone, with cached user vectors;
- *full*: encode + score + top-k, from item histories (3/4 of the rows full-length, 1/4
  shorter and left-padded).

Three implementations of the same function, all float32: **rerankd** (`Ranker`, warmed
up once; its warm-up time and executable count are reported), **numpy** (batched and
vectorised, bench/_numpy_baseline.py) and **torch** eager (bench/_torch_baseline.py,
run by bench/.venv/bin/python as a worker process; skipped with a note if missing).
Before timing, every implementation's user vectors and top-20 sets are checked against
rerankd's (and rerankd's vectors against the float64 reference of the tests).

Each figure is the wall time of one complete call (inputs from numpy, results back as
numpy), measured with ``time.perf_counter_ns`` after untimed warm-up calls. The
implementations take turns within each cell, in several rounds, so that noise from the
rest of the machine falls on all of them alike; the table's last column is the share of
all cores that other processes used meanwhile (/proc/stat). A cell where that exceeds
``--max-others`` is measured again after a quiet spell (``--retries`` times at most),
and a cell that stayed disturbed shows it.
Prints a table and the two targets and writes everything to bench/out/kernels.json
(``$RERANKD_BENCH_OUT`` instead of bench/out when set, as ``bench/run --out`` does).
``--smoke`` (``bench/run --quick``) compiles only the buckets it uses and never waits
for a quiet spell: it shows that the path works, its figures are rough.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime as dt
import functools
import gc
import importlib.util
import io
import json
import math
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

import _numpy_baseline as npb
import jax
import jaxlib
import numpy as np

from kernels.runtime import Ranker
from kernels.sasrec import SasrecConfig, init_params

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("RERANKD_BENCH_OUT") or ROOT / "bench" / "out")
TORCH_PYTHON = ROOT / "bench" / ".venv" / "bin" / "python"
TORCH_WORKER = ROOT / "bench" / "_torch_baseline.py"
CONFIG = SasrecConfig(num_items=50_000, max_len=50, dim=64, num_blocks=2, num_heads=1)
TOP_K = 20
FEATURES = ("popularity", "freshness", "bias")
WEIGHTS = (0.5, 0.25, -0.1)
CANDIDATES = (100, 500, 2000)
BATCHES = (1, 16, 64)
MODES = {"score": "score + top-k, cached user vectors", "full": "encode + score + top-k"}
VEC_RTOL = 1e-4

#: Ranker.score / encode return numpy; every implementation's call returns this tuple.
Result = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # vecs, scores, top s, top i


@dataclasses.dataclass(frozen=True, slots=True)
class Cell:
    """One benchmark cell's inputs: ``B`` users, ``N`` candidates each."""

    b: int
    n: int
    seqs: np.ndarray  # [B, L] int32, left-padded
    idx: np.ndarray  # [B, N] int32 candidate items
    feats: np.ndarray  # [B, N, F] float32
    vecs: np.ndarray  # [B, d] float32, rerankd's user vectors (the cache)

    @property
    def name(self) -> str:
        return f"B{self.b}_N{self.n}"


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """How many calls to time per cell and implementation."""

    budget_s: float  # per cell and implementation
    max_calls: int
    fast_min_calls: int  # for calls under 1 ms
    slow_min_calls: int
    rounds: int

    def calls(self, est_s: float) -> int:
        floor = self.fast_min_calls if est_s < 1e-3 else self.slow_min_calls
        return max(floor, min(self.max_calls, int(self.budget_s / max(est_s, 1e-7))))

    def warmup(self, est_s: float) -> int:
        return 20 if est_s < 1e-3 else 2


FULL_PLAN = Plan(budget_s=2.0, max_calls=5000, fast_min_calls=1000, slow_min_calls=50, rounds=4)
QUICK_PLAN = Plan(budget_s=0.2, max_calls=500, fast_min_calls=100, slow_min_calls=10, rounds=2)
SMOKE_PLAN = Plan(budget_s=0.1, max_calls=200, fast_min_calls=50, slow_min_calls=5, rounds=1)
#: --smoke's cells, and the only buckets it compiles
SMOKE_BATCHES, SMOKE_CANDIDATES = (1, 16, 64), 500


# --- model and inputs ------------------------------------------------------------------


def make_params() -> dict[str, np.ndarray]:
    """``init_params(key(0))`` with every 1-D parameter perturbed by N(0, 0.1^2)."""
    rng = np.random.default_rng(0)
    params = {
        n: np.asarray(v, np.float32) for n, v in init_params(jax.random.key(0), CONFIG).items()
    }
    for name, value in params.items():
        if value.ndim == 1:
            params[name] = (value + 0.1 * rng.standard_normal(value.shape)).astype(np.float32)
    return params


def make_inputs(rng: np.random.Generator, b: int, n: int) -> tuple[np.ndarray, ...]:
    """Histories ``[B, L]`` (every 4th row shorter), candidates ``[B, N]``, features."""
    length = CONFIG.max_len
    seqs = rng.integers(1, CONFIG.num_items + 1, (b, length), dtype=np.int32)
    for row in range(3, b, 4):
        seqs[row, : length - rng.integers(1, length)] = 0
    idx = rng.integers(1, CONFIG.num_items + 1, (b, n), dtype=np.int32)
    popularity = rng.random((b, n), np.float32) ** 3
    freshness = np.exp(-rng.exponential(2.0, (b, n))).astype(np.float32)
    feats = np.stack([popularity, freshness, np.ones((b, n), np.float32)], axis=-1)
    return seqs, idx, feats


def make_cells(ranker: Ranker, *, quick: bool, smoke: bool = False) -> list[Cell]:
    rng = np.random.default_rng(1)
    shapes = [(b, n) for n in CANDIDATES for b in BATCHES]
    if smoke:
        shapes = [(b, SMOKE_CANDIDATES) for b in SMOKE_BATCHES]
    elif quick:
        shapes = [(b, 500) for b in (1, 64)]
    cells = []
    for b, n in shapes:
        seqs, idx, feats = make_inputs(rng, b, n)
        cells.append(Cell(b, n, seqs, idx, feats, ranker.encode(seqs)))
    return cells


# --- implementations -------------------------------------------------------------------


class Impl(Protocol):
    """One implementation: its outputs for a cell, and timed calls."""

    name: str

    def outputs(self, cell: Cell, mode: str) -> Result: ...

    def time(self, cell: Cell, mode: str, calls: int, warmup: int) -> np.ndarray: ...


def time_calls(fn: Callable[[], object], calls: int, warmup: int) -> np.ndarray:
    """Nanoseconds of each of ``calls`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    gc.collect()
    ns = np.empty(calls, np.int64)
    clock = time.perf_counter_ns
    for i in range(calls):
        t0 = clock()
        fn()
        ns[i] = clock() - t0
    return ns


@dataclasses.dataclass(slots=True)
class LocalImpl:
    """An in-process implementation given as ``factory(cell, mode) -> call``."""

    name: str
    factory: Callable[[Cell, str], Callable[[], Result]]

    def outputs(self, cell: Cell, mode: str) -> Result:
        return self.factory(cell, mode)()

    def time(self, cell: Cell, mode: str, calls: int, warmup: int) -> np.ndarray:
        return time_calls(self.factory(cell, mode), calls, warmup)


def rerankd_factory(ranker: Ranker) -> Callable[[Cell, str], Callable[[], Result]]:
    def full(c: Cell) -> Result:
        vecs = ranker.encode(c.seqs)
        s = ranker.score(vecs, c.idx, features=c.feats)
        return vecs, s.scores, s.top_scores, s.top_idx

    def score(c: Cell) -> Result:
        s = ranker.score(c.vecs, c.idx, features=c.feats)
        return c.vecs, s.scores, s.top_scores, s.top_idx

    return lambda cell, mode: functools.partial(full if mode == "full" else score, cell)


def numpy_factory(params: dict[str, np.ndarray]) -> Callable[[Cell, str], Callable[[], Result]]:
    table, weights = params["item_emb"], np.asarray(WEIGHTS, np.float32)
    blocks, heads = CONFIG.num_blocks, CONFIG.num_heads

    def full(c: Cell) -> Result:
        vecs = npb.encode_users(params, c.seqs, num_blocks=blocks, num_heads=heads)
        return vecs, *npb.score_top_k(table, vecs, c.idx, c.feats, weights, k=TOP_K)

    def score(c: Cell) -> Result:
        return c.vecs, *npb.score_top_k(table, c.vecs, c.idx, c.feats, weights, k=TOP_K)

    return lambda cell, mode: functools.partial(full if mode == "full" else score, cell)


class TorchWorker:
    """The torch baseline in its own Python, driven over JSON lines (see its docstring)."""

    name = "torch"

    def __init__(self, python: Path, workdir: Path, *, device: str) -> None:
        self._stderr_path = workdir / "torch-stderr.txt"
        self._stderr: IO[str] = self._stderr_path.open("w")
        argv = [str(python), str(TORCH_WORKER), "--params", str(workdir / "params.npz")]
        argv += ["--inputs", str(workdir / "inputs.npz"), "--device", device]
        argv += ["--top-k", str(TOP_K), "--num-heads", str(CONFIG.num_heads)]
        self._proc = subprocess.Popen(  # noqa: S603 - our own script, our own interpreter
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )
        self.info = self._read()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            lines = self._stderr_path.read_text().strip().splitlines() or ["no output"]
            msg = f"torch worker exited with {self._proc.returncode}: {lines[-1]}"
            raise RuntimeError(msg)
        return json.loads(line)

    def _ask(self, **req: Any) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        return self._read()

    def outputs(self, cell: Cell, mode: str) -> Result:
        got = self._ask(op="outputs", cell=cell.name, mode=mode)
        vecs, scores, top_scores = (
            np.asarray(got[k], np.float32) for k in ("vecs", "scores", "top_scores")
        )
        return vecs, scores, top_scores, np.asarray(got["top_idx"], np.int64)

    def time(self, cell: Cell, mode: str, calls: int, warmup: int) -> np.ndarray:
        got = self._ask(op="time", cell=cell.name, mode=mode, calls=calls, warmup=warmup)
        return np.asarray(got["ns"], np.int64)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._ask_quit()
        self._stderr.close()

    def _ask_quit(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self._proc.stdin.close()
        self._proc.wait(timeout=30)


def write_worker_inputs(workdir: Path, params: dict[str, np.ndarray], cells: list[Cell]) -> None:
    weights = np.asarray(WEIGHTS, np.float32)
    np.savez(workdir / "params.npz", **params, feature_weights=weights)
    arrays = {
        f"{c.name}.{k}": getattr(c, k) for c in cells for k in ("seqs", "idx", "feats", "vecs")
    }
    np.savez(workdir / "inputs.npz", **arrays)


def start_torch(python: Path, workdir: Path, *, device: str) -> tuple[TorchWorker | None, str]:
    """The torch worker, or None and the reason it is skipped."""
    if not python.exists():
        return None, f"torch column skipped: {python} not found (run bench/setup-torch-env)"
    try:
        worker = TorchWorker(python, workdir, device=device)
    except (OSError, RuntimeError, json.JSONDecodeError) as e:
        return None, f"torch column skipped: the worker did not start ({e})"
    info = worker.info
    card = f" ({info['card']})" if info["card"] else ""
    return worker, f"torch {info['torch']} on {info['device']}{card}, {info['threads']} threads"


# --- correctness -------------------------------------------------------------------------


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """Largest per-row ``max |got - want| / max |want|``."""
    scale = np.abs(want).max(axis=-1)
    return float((np.abs(got - want).max(axis=-1) / scale).max())


def check_reference(params: dict[str, np.ndarray], cell: Cell) -> float:
    """rerankd's cached vectors against the tests' float64 per-row reference."""
    path = ROOT / "tests" / "kernels" / "sasrec_numpy.py"
    spec = importlib.util.spec_from_file_location("sasrec_numpy", path)
    assert spec is not None
    assert spec.loader is not None
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    want = ref.encode_users(
        params, cell.seqs, num_blocks=CONFIG.num_blocks, num_heads=CONFIG.num_heads
    )
    err = rel_error(cell.vecs.astype(np.float64), want)
    if err > VEC_RTOL:
        msg = f"rerankd user vectors differ from the float64 reference by {err:.2e} (> {VEC_RTOL})"
        raise SystemExit(msg)
    return err


def exact_ties(row: int, got: Result, want: Result) -> list[str]:
    """Evidence that row ``row``'s differing top-k members tie exactly, or []."""
    k_got, k_want = set(got[3][row].tolist()), set(want[3][row].tolist())
    extra, missing = sorted(k_got - k_want), sorted(k_want - k_got)
    evidence = []
    for whose, result in (("its own", got), ("rerankd's", want)):
        boundary = result[1][row][missing + extra]
        if np.all(boundary == boundary[0]):
            what = f"positions {missing + extra} all score {float(boundary[0])!r}"
            evidence.append(f"row {row}: {what} in {whose} scores")
    return evidence


def check_impl(impl: Impl, ref: Impl, cell: Cell, mode: str) -> dict[str, Any]:
    """Compare ``impl`` with rerankd on one cell; abort with the figures if they differ."""
    got, want = impl.outputs(cell, mode), ref.outputs(cell, mode)
    err = rel_error(got[0], want[0])
    what = f"{impl.name} {mode} {cell.name}"
    if err > VEC_RTOL:
        msg = f"{what}: user vectors differ from rerankd's by {err:.2e} relative (> {VEC_RTOL})"
        raise SystemExit(msg)
    ties = []
    for row in range(cell.b):
        if set(got[3][row].tolist()) != set(want[3][row].tolist()):
            evidence = exact_ties(row, got, want)
            if not evidence:
                msg = f"{what}: row {row}'s top-{TOP_K} set differs from rerankd's and is no tie"
                raise SystemExit(msg)
            ties += evidence
    top_err = rel_error(np.sort(got[2], axis=1), np.sort(want[2], axis=1))
    return {"vec_rel_error": err, "top_score_rel_error": top_err, "exact_ties": ties}


def check_all(impls: list[Impl], cells: list[Cell]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for impl in impls[1:]:
        for cell in cells:
            for mode in MODES:
                key = f"{impl.name} {mode} {cell.name}"
                out[key] = check_impl(impl, impls[0], cell, mode)
                for tie in out[key]["exact_ties"]:
                    print(f"{key}: top-{TOP_K} set differs by an exact tie: {tie}")
    return out


# --- timing ------------------------------------------------------------------------------


def probe(impl: Impl, cell: Cell, mode: str) -> float:
    """A first estimate of one call's seconds (median of 5, after 2 warm-up calls)."""
    return float(np.median(impl.time(cell, mode, 5, 2))) / 1e9


def measure_cell(impls: list[Impl], cell: Cell, mode: str, plan: Plan) -> list[dict[str, Any]]:
    est = {impl.name: probe(impl, cell, mode) for impl in impls}
    calls = {name: plan.calls(s) for name, s in est.items()}
    samples: dict[str, list[np.ndarray]] = {impl.name: [] for impl in impls}
    for _ in range(plan.rounds):
        for impl in impls:
            per_round = math.ceil(calls[impl.name] / plan.rounds)
            samples[impl.name].append(impl.time(cell, mode, per_round, plan.warmup(est[impl.name])))
    return [summarize(cell, mode, name, np.concatenate(ns)) for name, ns in samples.items()]


def summarize(cell: Cell, mode: str, impl: str, ns: np.ndarray) -> dict[str, Any]:
    us = ns / 1e3
    p50, p99 = np.percentile(us, [50, 99])
    return {
        "mode": mode, "cell": cell.name, "B": cell.b, "N": cell.n, "impl": impl,
        "calls": len(us), "p50_us": float(p50), "p99_us": float(p99),
        "mean_us": float(us.mean()), "max_us": float(us.max()),
        "per_query_us": float(p50) / cell.b,
    }  # fmt: skip


def measure(
    impls: list[Impl], cells: list[Cell], plan: Plan, meter: CpuMeter
) -> Iterator[dict[str, Any]]:
    for mode in MODES:
        for cell in cells:
            yield from measure_quietly(impls, cell, mode, plan, meter)


def measure_quietly(
    impls: list[Impl], cell: Cell, mode: str, plan: Plan, meter: CpuMeter
) -> list[dict[str, Any]]:
    """
    `measure_cell`, again (after waiting for a quiet spell) while other processes used
    more than ``meter.max_others`` of the cores, at most ``meter.retries`` times.
    """
    for attempt in range(meter.retries + 1):
        before = meter.snapshot()
        rows = measure_cell(impls, cell, mode, plan)
        wall_s, others = meter.others_share(before)
        print(f"  {mode:5s} {cell.name:9s} {wall_s:5.1f} s, other processes' CPU {others:4.0%}")
        if others <= meter.max_others or attempt == meter.retries:
            break
        print(f"    over {meter.max_others:.0%}: waiting for a quiet spell, then again", flush=True)
        meter.wait_quiet()
    return [{**row, "others_cpu_share": others, "attempts": attempt + 1} for row in rows]


class CpuMeter:
    """
    The share of all cores that *other* processes used: the machine's busy time
    (/proc/stat) minus this process's and the torch worker's (/proc/PID/stat).
    """

    def __init__(self, pids: list[int], *, max_others: float, retries: int) -> None:
        self._pids = pids
        self._tick = os.sysconf("SC_CLK_TCK")
        self.max_others = max_others
        self.retries = retries

    def snapshot(self) -> tuple[float, float, float]:
        """(wall s, machine busy CPU s, our processes' CPU s)."""
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        ours = 0
        for pid in self._pids:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ours += int(stat[11]) + int(stat[12])  # utime, stime
        return time.perf_counter(), busy / self._tick, ours / self._tick

    def others_share(self, before: tuple[float, float, float]) -> tuple[float, float]:
        """(wall s since ``before``, others' CPU time / (wall time x cores))."""
        now = self.snapshot()
        wall, busy, ours = (a - b for a, b in zip(now, before, strict=True))
        return wall, max(0.0, busy - ours) / (wall * (os.cpu_count() or 1))

    def wait_quiet(self, *, sample_s: float = 3.0, limit_s: float = 180.0) -> None:
        """Sleep until other processes use at most ``max_others`` over ``sample_s``."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            before = self.snapshot()
            time.sleep(sample_s)
            if self.others_share(before)[1] <= self.max_others:
                return


# --- report ------------------------------------------------------------------------------


def find(rows: list[dict[str, Any]], mode: str, b: int, n: int, impl: str) -> dict[str, Any] | None:
    return next(
        (r for r in rows if (r["mode"], r["B"], r["N"], r["impl"]) == (mode, b, n, impl)), None
    )


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    score = find(rows, "score", 1, 500, "rerankd")
    assert score is not None
    first = {
        "target": "score + top-k, cached vector, N = 500, B = 1: rerankd p99 < 200 µs",
        "measured": f"p99 {score['p99_us']:.1f} µs (p50 {score['p50_us']:.1f} µs); "
        f"other processes' CPU {score['others_cpu_share']:.0%}",
        "verdict": "MET" if score["p99_us"] < 200 else "MISSED",
    }
    ours = find(rows, "full", 64, 500, "rerankd")
    assert ours is not None
    base = {i: find(rows, "full", 64, 500, i) for i in ("numpy", "torch")}
    figures = [f"rerankd {ours['per_query_us']:.1f}"]
    figures += [f"{i} {r['per_query_us']:.1f}" for i, r in base.items() if r is not None]
    beaten = all(ours["per_query_us"] < r["per_query_us"] for r in base.values() if r is not None)
    verdict = "MET" if beaten else "MISSED"
    if beaten and base["torch"] is None:
        verdict = "MET vs numpy only (torch skipped)"
    second = {
        "target": "encode + score + top-k, B = 64, N = 500: rerankd per-query cost "
        "below both baselines",
        "measured": "per-query µs (p50 / 64): "
        + ", ".join(figures)
        + f"; other processes' CPU {ours['others_cpu_share']:.0%}",
        "verdict": verdict,
    }
    return [first, second]


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "cell",
        "impl",
        "calls",
        "p50 µs",
        "p99 µs",
        "per-query µs",
        "p50/rerankd",
        "others' CPU",
    )
    lines = []
    for mode, title in MODES.items():
        lines += ["", f"{mode}: {title}", "  ".join(f"{h:>12s}" for h in head)]
        for r in (r for r in rows if r["mode"] == mode):
            ours = find(rows, mode, r["B"], r["N"], "rerankd")
            ratio = r["p50_us"] / ours["p50_us"] if ours else math.nan
            cells = (
                r["cell"], r["impl"], str(r["calls"]), f"{r['p50_us']:,.1f}",
                f"{r['p99_us']:,.1f}", f"{r['per_query_us']:,.2f}", f"{ratio:.2f}x",
                f"{r['others_cpu_share']:.0%}",
            )  # fmt: skip
            lines.append("  ".join(f"{c:>12s}" for c in cells))
    return "\n".join(lines)


def git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)  # noqa: S603, S607
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return done.stdout.strip()


def machine(device: jax.Device) -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "?")
    mem = Path("/proc/meminfo").read_text().split()
    dirty = (
        " (kernels/ or bench/ modified)"
        if git("status", "--porcelain", "-uno", "kernels", "bench")
        else ""
    )
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD") + dirty,
        "cpu": cpu, "cores": os.cpu_count(),
        "ram_gib": round(int(mem[mem.index("MemTotal:") + 1]) / 2**20, 1),
        "load_avg_at_start": os.getloadavg(), "platform": platform.platform(),
        "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "jax_device": str(device), "jax_platform": device.platform,
        "card": None if device.platform == "cpu" else device.device_kind,
        "numpy": np.__version__, "numpy_blas": blas,
    }  # fmt: skip


def pick_device(choice: str) -> jax.Device:
    if choice == "cpu":
        return jax.devices("cpu")[0]
    if choice == "gpu":
        try:
            return jax.devices("gpu")[0]
        except RuntimeError as e:
            msg = f"--device gpu: jax has no GPU backend here ({e}); install jax[cuda12]"
            raise SystemExit(msg) from e
    return jax.devices()[0]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="N = 500, B in {1, 64}, ~10x fewer calls"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="N = 500, B in {1, 16, 64}, one short round, no retries: checks that it runs",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="where rerankd (and torch) run; auto: jax's default device",
    )
    parser.add_argument(
        "--torch-python",
        type=Path,
        default=TORCH_PYTHON,
        help=f"the Python with torch for the baseline (default {TORCH_PYTHON})",
    )
    parser.add_argument(
        "--max-others",
        type=float,
        default=0.1,
        help="measure a cell again if other processes used more than this share of all "
        "cores meanwhile (default 0.1; 1 never does)",
    )
    parser.add_argument(
        "--retries", type=int, default=3, help="how often a cell may be measured again"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also cProfile rerankd's score-only calls (B = 1, N = 500) and print the top",
    )
    return parser.parse_args()


def start_rerankd(
    device: jax.Device, *, smoke: bool = False
) -> tuple[dict[str, np.ndarray], Ranker, dict[str, Any]]:
    """The model's parameters, a warmed-up Ranker on ``device``, and what warm-up did."""
    params = make_params()
    buckets: dict[str, Any] = {}
    if smoke:  # the smoke run's cells need only these executables
        buckets = {"batch_buckets": SMOKE_BATCHES, "candidate_buckets": (512,)}
    ranker = Ranker(
        params, CONFIG, top_k=TOP_K, feature_weights=WEIGHTS, device=device, **buckets
    )
    warm = ranker.warmup()
    print(
        f"rerankd warm-up: {warm.executables} executables in {warm.seconds:.1f} s on {warm.device}"
    )
    return (
        params,
        ranker,
        {"seconds": warm.seconds, "executables": warm.executables, "device": warm.device},
    )


def profile_score(ranker: Ranker, cell: Cell, calls: int) -> str:
    """cProfile of ``calls`` score-only calls on ``cell``: the top functions by own time."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        ranker.score(cell.vecs, cell.idx, features=cell.feats)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
    return f"Ranker.score on {cell.name}, {calls} calls:\n{buf.getvalue()}"


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    device = pick_device(args.device)
    report: dict[str, Any] = {
        "machine": machine(device),
        "quick": args.quick,
        "smoke": args.smoke,
        "model": {
            **CONFIG.to_dict(),
            "top_k": TOP_K,
            "features": dict(zip(FEATURES, WEIGHTS, strict=True)),
        },
        "max_others_cpu_share": args.max_others,
        "retries": args.retries,
    }
    params, ranker, report["warmup"] = start_rerankd(device, smoke=args.smoke)
    cells = make_cells(ranker, quick=args.quick, smoke=args.smoke)
    report["reference_vec_rel_error"] = check_reference(params, cells[-1])
    write_worker_inputs(workdir, params, cells)
    torch_device = "cpu" if device.platform == "cpu" else "cuda"
    worker, note = start_torch(args.torch_python, workdir, device=torch_device)
    print(note)
    report["torch"] = {"note": note, **(worker.info if worker else {})}
    impls: list[Impl] = [
        LocalImpl("rerankd", rerankd_factory(ranker)),
        LocalImpl("numpy", numpy_factory(params)),
    ]
    impls += [worker] if worker else []
    try:
        report["checks"] = check_all(impls, cells)
        print("correctness: every implementation matches rerankd; timing ...", flush=True)
        pids = [os.getpid()] + ([worker.pid] if worker else [])
        retries = 0 if args.smoke else args.retries
        meter = CpuMeter(pids, max_others=args.max_others, retries=retries)
        plan = SMOKE_PLAN if args.smoke else QUICK_PLAN if args.quick else FULL_PLAN
        report["cells"] = list(measure(impls, cells, plan, meter))
    finally:
        if worker:
            worker.close()
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    report["targets"] = targets(report["cells"])
    if args.profile:
        cell = next(c for c in cells if (c.b, c.n) == (1, 500))
        report["profile"] = profile_score(ranker, cell, 300 if args.quick or args.smoke else 3000)
    return report


def print_report(report: dict[str, Any]) -> None:
    m, t = report["machine"], report["torch"]
    card = f" ({m['card']})" if m["card"] else ""
    print(
        f"\nMachine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; Python {m['python']}, "
        f"jax {m['jax']} on {m['jax_device']}{card}, numpy {m['numpy']} ({m['numpy_blas']}); "
        f"{t['note']}; {m['date']}, commit {m['git_commit']}"
        + (" (--smoke)" if report["smoke"] else " (--quick)" if report["quick"] else "")
    )
    w = report["warmup"]
    print(f"rerankd warm-up: {w['executables']} executables, {w['seconds']:.1f} s")
    print(table(report["cells"]))
    print()
    for tg in report["targets"]:
        print(f"{tg['verdict']:>8s}  {tg['target']}\n          {tg['measured']}")


def main() -> None:
    args = parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-kernels-") as tmp:
        report = run(args, Path(tmp))
    report["seconds"] = round(time.perf_counter() - started, 1)
    (OUT / "kernels.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_report(report)
    if "profile" in report:
        print("\n" + report["profile"])
    print(f"\n{report['seconds']} s; figures in {OUT / 'kernels.json'}")


if __name__ == "__main__":
    sys.exit(main())
