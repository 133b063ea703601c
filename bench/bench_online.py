"""
Online learning step: what one step (and its publishing) costs, by catalogue size.

    python bench/bench_online.py            # 23,716 / 100,000 / 1,000,000 items, about 2 minutes
    python bench/bench_online.py --smoke    # 23,716 items only, seconds

The daemon runs :meth:`daemon.online.OnlineLearner.step_and_publish` every
``[online].interval_s`` (1 s) on its cold-start thread, off the request path. For
each catalogue size (d = 64, a random item table) and for biases only against biases
plus embeddings (``embedding_learning_rate`` 0.005), each step gets ``examples`` new
(user vector, item) examples and is timed from the first example's hand-over to the
published arrays; the figures are the median and p99 over ``--steps`` steps, and the
bytes the learner and the published arrays hold. The ranking it publishes to is a
stand-in that keeps what it is given (what ``Ranking.set_item_bias`` and
``set_item_table`` do without cold-start rows; with them, ``set_item_table`` copies
the table once more). Writes bench/out/online.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_daemon import write_results  # noqa: E402

from daemon.online import OnlineLearner, OnlineOptions  # noqa: E402

DIM = 64
EMBEDDING_RATE = 0.005


class _Ranking:
    """Holds what the learner publishes, as `daemon.ranking.Ranking` does (no cold rows)."""

    def __init__(self, table: np.ndarray) -> None:
        self.ranker = SimpleNamespace(item_table=table)
        self.observer: Any = None
        self.bias: np.ndarray | None = None
        self.table: np.ndarray | None = None

    def set_item_bias(self, bias: np.ndarray, *, model: object = None) -> None:  # noqa: ARG002
        self.bias = bias

    def set_item_table(self, table: np.ndarray, *, model: object = None) -> None:  # noqa: ARG002
        self.table = np.asarray(table, np.float32)


def measure(items: int, examples: int, steps: int, *, embeddings: bool) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    table = rng.normal(scale=0.1, size=(items + 1, DIM)).astype(np.float32)
    ranking = _Ranking(table)
    rate = EMBEDDING_RATE if embeddings else 0.0
    learner = OnlineLearner(OnlineOptions(enabled=True, embedding_learning_rate=rate))
    learner.attach(ranking)  # type: ignore[arg-type]
    vectors = rng.normal(scale=0.1, size=(examples, DIM)).astype(np.float32)
    times = []
    for _ in range(steps + 1):
        items_seen = rng.integers(1, items + 1, size=examples)
        t0 = time.perf_counter()
        for vector, item in zip(vectors, items_seen, strict=True):
            learner.observe(vector, np.asarray([item]))
        learner.step_and_publish()
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times[1:]) * 1e3  # the first step allocates the arrays
    change = learner.table_change
    held = learner.bias.nbytes + (0 if change is None else change.nbytes)
    published = (ranking.bias.nbytes if ranking.bias is not None else 0) + (
        ranking.table.nbytes if ranking.table is not None else 0)  # fmt: skip
    return {"items": items, "examples": examples, "embeddings": embeddings, "steps": steps,
            "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "learner_mb": round(held / 2**20, 1), "published_mb": round(published / 2**20, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the smallest catalogue only")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    sizes = [23_716] if args.smoke else [23_716, 100_000, 1_000_000]
    rows = []
    print(f"{'items':>10} {'examples':>8} {'embeddings':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'learner MB':>10} {'published MB':>12}")  # fmt: skip
    for items in sizes:
        for examples in (10, 1000):
            for embeddings in (False, True):
                row = measure(items, examples, 10 if args.smoke else args.steps,
                              embeddings=embeddings)  # fmt: skip
                rows.append(row)
                print(f"{items:>10,} {examples:>8} {embeddings!s:>10} {row['p50_ms']:>8.2f} "
                      f"{row['p99_ms']:>8.2f} {row['learner_mb']:>10.1f} "
                      f"{row['published_mb']:>12.1f}", flush=True)  # fmt: skip
    write_results({"dim": DIM, "embedding_learning_rate": EMBEDDING_RATE, "rows": rows,
                   "targets": []}, "online", quick=args.smoke, smoke=args.smoke)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
