"""
bench/run's figures: each benchmark's JSON flattened into named figures with units.

Every benchmark writes its own JSON shape (bench/out/<name>.json). One extractor per
benchmark reads the keys it knows, by name, and returns figures of the form
``{"bench", "name", "value", "unit", **parameters}`` (``connections``, ``batch``,
``feed``, ``stat``, ...), so a figure's meaning never depends on where it sat in the
JSON. A benchmark whose JSON lacks a key its extractor needs is reported as failed
(:class:`ExtractError`) instead of giving half its figures.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import math
import os
import platform
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "EXTRACTORS", "ExtractError", "extract", "git_state", "iter_known", "machine", "now",
    "targets_of",
]  # fmt: skip

Figure = dict[str, Any]
_PERCENTILES = (("p50", "p50_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms"))


class ExtractError(Exception):
    """A benchmark's JSON lacks what its extractor reads (or holds a value of a wrong type)."""

    def __init__(self, bench: str, problem: str) -> None:
        self.bench, self.problem = bench, problem
        super().__init__(f"{bench}: its JSON cannot be read into figures: {problem}")


class _Figures:
    """Collects one benchmark's figures; ``None`` values (not measured) are left out."""

    def __init__(self, bench: str) -> None:
        self.bench = bench
        self.items: list[Figure] = []

    def add(self, name: str, value: float | None, unit: str, **params: Any) -> None:
        if value is None:
            return
        value = float(value)
        if not math.isfinite(value):
            raise ExtractError(self.bench, f"{name} {params}: not a finite number ({value})")
        self.items.append({"bench": self.bench, "name": name, "value": value, "unit": unit,
                           **params})  # fmt: skip

    def percentiles(self, name: str, d: dict[str, Any], **params: Any) -> None:
        for stat, key in _PERCENTILES:
            self.add(name, d.get(key), "ms", stat=stat, **params)


# ----------------------------------------------------------------- the extractors


def _eventstore(r: dict[str, Any], f: _Figures) -> None:
    d = r["decode"]
    f.add("decode + validate, JSON lists of 1000", d["list_events_per_s"]["median"], "events/s")
    f.add("decode + validate, per list of 1000", d["list_ms_per_1000"]["p99"], "ms", stat="p99")
    f.add("decode + validate, one event", d["one_events_per_s"]["median"], "events/s")
    for stat in ("median", "p99"):
        f.add("decode + validate, per call", d["one_us_per_call"][stat], "µs", stat=stat)
    for key, a in r["append"].items():
        batch, _, sync = key.partition(", synchronous=")
        params = {"batch": int(batch), "synchronous": sync or "FULL"}
        f.add("durable append", a["events_per_s"]["median"], "events/s", **params)
        for stat in ("median", "p99"):
            f.add("append commit latency", a["commit_ms"][stat], "ms", stat=stat, **params)
    big = r["append_large"]
    f.add("durable append into a large log", big["events_per_s"]["median"], "events/s",
          batch=1000, log_events=big["log_events"])  # fmt: skip
    f.add("append commit latency, large log", big["commit_ms"]["p99"], "ms", stat="p99",
          batch=1000, log_events=big["log_events"])  # fmt: skip
    fold = r["fold"]
    f.add("fold", fold["events_per_s"]["median"], "events/s", users=fold["users"])
    for key, batch in (("pipeline", 1000), ("pipeline_5000", 5000)):
        f.add("decode + append + fold, one thread", r[key]["events_per_s"]["median"],
              "events/s", batch=batch)  # fmt: skip
        f.add("decode + append + fold, per batch", r[key]["batch_ms"]["p99"], "ms",
              stat="p99", batch=batch)  # fmt: skip
    for g in r["group_commit"].values():
        params = {"producers": g["producers"], "request_events": g["request_events"]}
        f.add("decode + append + fold via GroupCommitter", g["events_per_s"]["median"],
              "events/s", **params)  # fmt: skip
        for stat in ("median", "p99"):
            f.add("GroupCommitter submit to ack", g["ack_ms"][stat], "ms", stat=stat, **params)
    rp = r["replay"]
    f.add("replay: open a store with no snapshot", rp["store_open_s"]["median"], "s",
          events=rp["events"])  # fmt: skip
    f.add("replay: fold the whole log", rp["project_read_s"]["median"], "s", events=rp["events"])
    f.add("snapshot write", rp["snapshot_write_s"], "s", users=rp["users"])
    f.add("snapshot size", rp["snapshot_bytes"] / 2**20, "MiB", users=rp["users"])
    mem = r["memory"]
    f.add("state per user, arrays", mem["array_bytes_per_user"], "B", seq_len=mem["seq_len"])
    f.add("state per user, arrays + id maps", mem["traced_bytes_per_user_at_full_capacity"],
          "B", seq_len=mem["seq_len"])  # fmt: skip
    f.add("state per user, RSS growth", mem["rss_bytes_per_user"], "B", users=mem["users"])


def _kernels(r: dict[str, Any], f: _Figures) -> None:
    f.add("warm-up", r["warmup"]["seconds"], "s")
    f.add("warm-up executables", r["warmup"]["executables"], "1")
    for c in r["cells"]:
        params = {"mode": c["mode"], "impl": c["impl"], "batch": c["B"], "candidates": c["N"]}
        for stat in ("p50", "p99"):
            f.add("latency per call", c[f"{stat}_us"], "µs", stat=stat, **params)
        f.add("users scored per second", c["B"] / (c["p50_us"] * 1e-6), "users/s",
              stat="p50", **params)  # fmt: skip


def _daemon(r: dict[str, Any], f: _Figures) -> None:
    for key, ingest in (("rank", False), ("rank_with_ingest", True)):
        for connections, cell in r[key].items():
            params = {"connections": int(connections), "ingest": ingest}
            f.percentiles("rank latency", cell, **params)
            f.add("rank throughput", cell["per_s"], "requests/s", **params)
            if ingest:
                f.add("concurrent ingest held", cell["ingested_per_s"], "events/s", **params)
    f.percentiles("rank latency right after the user's event", r["after_new_event"],
                  connections=1)  # fmt: skip
    f.percentiles("event to visible", r["event_to_visible"], feed="socket")
    f.add("event-to-visible probes", r["event_to_visible"]["n"], "1", feed="socket")


def _feeds(r: dict[str, Any], f: _Figures) -> None:
    kafka, mqtt = r["kafka"], r["mqtt"]
    drains = [("kafka", 1, kafka["throughput"])]
    drains += [("mqtt", int(key.split("_")[1]), value) for key, value in mqtt.items()
               if key.startswith("throughput_")]  # fmt: skip
    for feed, per_message, t in drains:
        params = {"feed": feed, "events_per_message": per_message, "backlog": t["events"]}
        f.add("sustained rate into the log, whole drain", t["per_s_whole"], "events/s", **params)
        f.add("sustained rate into the log, middle 80%", t["per_s_middle_80pct"], "events/s",
              **params)  # fmt: skip
        f.add("drain time", t["drain_s"], "s", **params)
    f.add("backlog publish time", kafka["published_s"], "s", feed="kafka",
          backlog=kafka["throughput"]["events"])  # fmt: skip
    for feed, part in (("kafka", kafka), ("mqtt", mqtt)):
        e2v = part["event_to_visible"]
        f.percentiles("event to visible", e2v, feed=feed, stream_rate=1000)
        f.add("event-to-visible probes", e2v["n"], "1", feed=feed)
        f.add("stream behind the probes", e2v["stream_per_s"], "events/s", feed=feed)
    f.add("MQTT client stack alone", mqtt["client_ceiling"]["per_s"], "messages/s", feed="mqtt")
    f.add("MQTT messages unacknowledged at the peak", mqtt.get("max_unacked"), "messages",
          feed="mqtt")  # fmt: skip


#: bench_quality's metric keys: (figure name, unit)
_QUALITY_METRICS = {"hr@10": ("HR@10", "1"), "ndcg@10": ("NDCG@10", "1"), "mrr": ("MRR", "1"),
                    "coverage@10": ("coverage@10", "1"), "ild@10": ("ILD@10", "1"),
                    "novelty@10": ("novelty@10", "bits")}  # fmt: skip


def _quality(r: dict[str, Any], f: _Figures) -> None:
    for dataset, d in r.items():
        if not (isinstance(d, dict) and "runs" in d):
            continue
        seeds = len(d["runs"])
        for protocol in ("sampled-100", "full"):
            for metric, spread in d[protocol].items():
                name, unit = _QUALITY_METRICS[metric]
                f.add(name, spread["mean"], unit, dataset=dataset, protocol=protocol,
                      stat="mean", seeds=seeds, std=spread["std"])  # fmt: skip
        f.add("training time", d["train_seconds"]["max"], "s", dataset=dataset, stat="max",
              seeds=seeds)  # fmt: skip
        f.add("users", d["data"]["users"], "1", dataset=dataset)
        rp = d["replay"]
        for mode in ("frozen", "live", "online"):
            for metric in ("ndcg@10", "hr@10"):
                f.add(f"replay {_QUALITY_METRICS[metric][0]}", rp.get(mode, {}).get(metric), "1",
                      dataset=dataset, mode=mode)  # fmt: skip
        for key, name in (("lift", "live over frozen"), ("online_lift", "online over live")):
            for metric, value in (rp.get(key) or {}).items():
                f.add(f"replay {_QUALITY_METRICS[metric][0]} lift, {name}", value, "1",
                      dataset=dataset)
        after = rp.get("after_first")  # absent from reports before it existed
        if after is not None:
            for metric, value in after["lift"].items():
                f.add(f"replay {_QUALITY_METRICS[metric][0]} lift, live over frozen, after a "
                      "user's first held-out interaction", value, "1", dataset=dataset,
                      held_out=after["held_out"])  # fmt: skip
        f.add("replay held-out interactions", rp["held_out"], "1", dataset=dataset)
        f.add("replay time", rp["seconds"], "s", dataset=dataset)


_POLICY_METRICS = {"ndcg_at_10": "NDCG@10", "hr_at_10": "HR@10",
                   "ild_at_10_embedding": "ILD@10 embedding", "ild_at_10_genre": "ILD@10 genre"}


def _policies(r: dict[str, Any], f: _Figures) -> None:
    for dataset, d in r["datasets"].items():
        for row in d["lambdas"]:
            for key, name in _POLICY_METRICS.items():
                if key in row:
                    f.add(name, row[key], "1", dataset=dataset, mmr_lambda=row["lambda"])
                    f.add(f"{name} change against λ = 1", row[f"{key}_change"], "1",
                          dataset=dataset, mmr_lambda=row["lambda"])  # fmt: skip
        f.add("training time", d["timings"]["train_s"], "s", dataset=dataset)


def _online(r: dict[str, Any], f: _Figures) -> None:
    for row in r["rows"]:
        where = {"items": row["items"], "examples": row["examples"],
                 "embeddings": row["embeddings"]}  # fmt: skip
        f.add("online step and publish", row["p50_ms"], "ms", stat="p50", **where)
        f.add("online step and publish", row["p99_ms"], "ms", stat="p99", **where)
        f.add("online learner arrays", row["learner_mb"], "MB", **where)
        f.add("online published arrays", row["published_mb"], "MB", **where)


def _soak(r: dict[str, Any], f: _Figures) -> None:
    """The contract's figures (tmp/soakschema.md): run shape and what the samples show."""
    samples = r["samples"]
    if not samples:
        raise ExtractError("soak", "samples: empty")
    f.add("length", r["minutes"], "min")
    f.add("asked rank rate", r["rank_rate"], "requests/s")
    f.add("asked event rate", r["event_rate"], "events/s")
    f.add("log retention", r.get("retention_minutes", 0.0), "min")  # 0: none (older runs)
    # a sample ends its period at t_s; after warm-up: periods that start after it, as
    # bench/soak's verdicts count them (the period: sample_s, or the first sample's t_s)
    period = r.get("sample_s") or samples[0]["t_s"]
    post = [s for s in samples
            if s["t_s"] - period >= r["warmup_minutes"] * 60 - 1e-6] or samples  # fmt: skip
    for stat, pick in (("first after warm-up", post[0]), ("last", samples[-1])):
        f.add("daemon RSS", pick["rss_mb"], "MB", stat=stat)
        f.add("open fds", pick["fds"], "1", stat=stat)
        f.add("log on disk", pick["log_bytes"] / 2**20, "MiB", stat=stat)
    f.add("daemon RSS", max(s["rss_mb"] for s in post), "MB", stat="max after warm-up")
    f.add("rank latency", max(s["rank_p99_ms"] for s in post), "ms",
          stat="worst sample p99 after warm-up")  # fmt: skip
    f.add("rank latency", samples[-1]["rank_p50_ms"], "ms", stat="last sample p50")
    f.add("ranks answered", sum(s["ranks"] for s in samples), "requests")
    f.add("events made durable", sum(s["events"] for s in samples), "events")
    f.add("rank errors", sum(s["rank_errors"] for s in samples), "errors")
    f.add("ingest errors", sum(s["ingest_errors"] for s in samples), "errors")


#: benchmark name -> extractor of its JSON (bench/out/<name>.json)
EXTRACTORS: dict[str, Callable[[dict[str, Any], _Figures], None]] = {
    "eventstore": _eventstore,
    "kernels": _kernels,
    "daemon": _daemon,
    "feeds": _feeds,
    "quality": _quality,
    "policies": _policies,
    "online": _online,
    "soak": _soak,
}


def extract(bench: str, raw: dict[str, Any]) -> list[Figure]:
    """The figures of ``bench``'s JSON ``raw``; :class:`ExtractError` if a key is missing."""
    f = _Figures(bench)
    try:
        EXTRACTORS[bench](raw, f)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
        raise ExtractError(bench, f"{type(e).__name__}: {e}") from e
    return f.items


def targets_of(bench: str, raw: dict[str, Any]) -> list[dict[str, str]]:
    """
    ``raw``'s targets as ``{"bench", "target", "measured", "verdict"}``, verdict MET or
    MISSED. bench_eventstore says ``"met": bool``; a verdict with a qualifier ("MET vs
    numpy only (torch skipped)") keeps the qualifier as ``note``.
    """
    out = []
    for t in raw.get("targets", []):
        if "verdict" in t:
            word, _, note = str(t["verdict"]).partition(" ")
        else:
            word, note = ("MET" if t["met"] else "MISSED"), ""
        if word not in {"MET", "MISSED"}:
            raise ExtractError(bench, f"target {t['target']!r}: verdict {t['verdict']!r}")
        row = {"bench": bench, "target": t["target"], "measured": str(t["measured"]),
               "verdict": word}  # fmt: skip
        if note:
            row["note"] = note
        out.append(row)
    return out


# ------------------------------------------------------------ machine and commit


def _first(path: str, prefix: str) -> str | None:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(prefix)), None)


def _os_name() -> str:
    try:
        fields = dict(
            line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines()
            if "=" in line
        )  # fmt: skip
        name = fields.get("PRETTY_NAME", "").strip('"')
    except OSError:
        name = ""
    return f"{name or platform.system()} (kernel {platform.release()})"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python and the libraries the figures depend on."""
    mem_kib = _first("/proc/meminfo", "MemTotal")
    return {
        "cpu": _first("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem_kib.split()[0]) / 2**20, 1) if mem_kib else None,
        "os": _os_name(),
        "python": platform.python_version(),
        **{name: _version(name) for name in ("jax", "jaxlib", "numpy")},
    }


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,  # noqa: S603, S607 - git on PATH, our arguments
                              check=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_state(root: Path) -> dict[str, Any]:
    """``git_commit`` (None outside a checkout) and ``git_dirty`` (uncommitted changes)."""
    status = _git(root, "status", "--porcelain")
    return {"git_commit": _git(root, "rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status)}  # fmt: skip


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def iter_known(raw_dir: Path) -> Iterator[tuple[str, Path]]:
    """(name, path) of every ``<name>.json`` in ``raw_dir`` that an extractor reads."""
    for name in EXTRACTORS:
        path = raw_dir / f"{name}.json"
        if path.is_file():
            yield name, path
