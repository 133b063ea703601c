"""
bench/run's report: RESULTS.md and its PNG plots, from results.json's content.

The plots (matplotlib, Agg backend) go to ``results/`` next to RESULTS.md, which links
them relatively:

- ``daemon-latency.png``: rank latency p50/p99/p99.9 against connections, alone and
  with the concurrent ingest stream (bench_daemon);
- ``throughput.png``: users scored per second against the batch size B per candidate
  count N (bench_kernels), and durable appends per second against the batch size
  (bench_eventstore);
- ``event-to-visible.png``: the distribution (CDF) of the event-to-visible probes of
  bench_daemon (socket) and bench_feeds (Kafka, MQTT);
- ``soak.png``: bench/soak's own plot, copied, when its results are there.

A plot whose benchmark did not run (``--only``) is left out.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["markdown", "write_plots"]

Figure = dict[str, Any]
#: the targets the event-to-visible plot marks: the socket's (issue 4), the feeds' (issue 5)
_VISIBLE_TARGETS_MS = {"socket": 10.0, "feeds": 20.0}


def _pyplot() -> Any:
    import matplotlib as mpl  # noqa: PLC0415 - only the report needs it

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def NullLocator() -> Any:  # noqa: N802 - matplotlib's class, imported late
    from matplotlib.ticker import NullLocator  # noqa: PLC0415

    return NullLocator()


def _select(figures: Iterable[Figure], bench: str, name: str, **params: Any) -> list[Figure]:
    return [f for f in figures if f["bench"] == bench and f["name"] == name
            and all(f.get(k) == v for k, v in params.items())]  # fmt: skip


# ------------------------------------------------------------------------- plots


def plot_latency(figures: list[Figure], path: Path) -> bool:
    """Rank latency percentiles against connections, without and with ingest."""
    rows = _select(figures, "daemon", "rank latency")
    if not rows:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, ingest in zip(axes, (False, True), strict=True):
        for stat, style in (("p50", "o-"), ("p99", "s-"), ("p99.9", "^-")):
            points = sorted((f["connections"], f["value"]) for f in rows
                            if f["ingest"] is ingest and f["stat"] == stat)  # fmt: skip
            if points:
                x, y = zip(*points, strict=True)
                ax.plot(x, y, style, label=stat)
        _ticks(ax, [f["connections"] for f in rows])
        ax.set_yscale("log")
        ax.set_xlabel("connections (closed loops)")
        ax.set_title("rank alone" if not ingest else "with a concurrent ingest stream")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("rank latency (ms), 500 candidates")
    _save(plt, fig, path)
    return True


def plot_throughput(figures: list[Figure], path: Path) -> bool:
    """Users scored/s against B per N (kernels) and durable appends/s against batch size."""
    kernels = _select(figures, "kernels", "users scored per second")
    appends = _select(figures, "eventstore", "durable append", synchronous="FULL")
    panels = [p for p in (("kernels", kernels), ("eventstore", appends)) if p[1]]
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (bench, rows) in zip(axes[0], panels, strict=True):
        if bench == "kernels":
            _kernel_lines(ax, rows)
        else:
            points = sorted((f["batch"], f["value"]) for f in rows)
            x, y = zip(*points, strict=True)
            ax.plot(x, y, "o-", label="durable append (synchronous=FULL)")
            ax.set_xlabel("events per commit")
            ax.set_ylabel("events/s")
            ax.set_title("event store: appends against batch size")
        _ticks(ax, [f["batch"] for f in rows])
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    _save(plt, fig, path)
    return True


def _kernel_lines(ax: Any, rows: list[Figure]) -> None:
    series: dict[tuple[str, str, int], list[tuple[int, float]]] = defaultdict(list)
    for f in rows:
        series[f["impl"], f["mode"], f["candidates"]].append((f["batch"], f["value"]))
    styles = {"rerankd": "-", "numpy": "--", "torch": ":"}
    for (impl, mode, n), points in sorted(series.items()):
        if impl != "rerankd" and n != 500:  # baselines at N = 500 only: readable
            continue
        x, y = zip(*sorted(points), strict=True)
        marker = "o" if mode == "score" else "s"
        ax.plot(x, y, styles.get(impl, "-.") + marker, label=f"{impl}, {mode}, N = {n}")
    ax.set_xlabel("users per call (B)")
    ax.set_ylabel("users scored per second (from p50)")
    ax.set_title("kernels: throughput against batch size")


def plot_visible(raws: dict[str, dict[str, Any]], path: Path) -> bool:
    """CDF of the event-to-visible probe latencies of every feed that has samples."""
    series = []
    if "daemon" in raws:
        series.append(("socket (bench_daemon)", raws["daemon"]["event_to_visible"]))
    if "feeds" in raws:
        series += [(f"{feed} (bench_feeds)", raws["feeds"][feed]["event_to_visible"])
                   for feed in ("kafka", "mqtt")]  # fmt: skip
    series = [(label, np.sort(np.asarray(e2v["samples_ms"], float))) for label, e2v in series
              if e2v.get("samples_ms")]  # fmt: skip
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, ms in series:
        ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post",
                label=f"{label}, {len(ms)} probes")  # fmt: skip
    for what, bound in _VISIBLE_TARGETS_MS.items():
        ax.axvline(bound, color="0.5", ls="--", lw=1)
        ax.text(bound, 0.02, f" {what} target p99 {bound:g} ms", rotation=90, fontsize=7,
                va="bottom", color="0.3")  # fmt: skip
    ax.axhline(0.99, color="0.7", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("event to visible in a rank answer (ms)")
    ax.set_ylabel("share of probes (CDF)")
    ax.set_title("event-to-visible latency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    _save(plt, fig, path)
    return True


def _ticks(ax: Any, values: Iterable[int]) -> None:
    """A log x axis labelled with the measured values themselves."""
    ticks = sorted(set(values))
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(figures: list[Figure], raws: dict[str, dict[str, Any]], raw_dir: Path,
                plot_dir: Path) -> dict[str, Path]:  # fmt: skip
    """Every plot there is data for, under ``plot_dir``: {title: path}."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    plots: list[tuple[str, str, Callable[[Path], bool]]] = [
        ("Rank latency against concurrency", "daemon-latency.png",
         lambda p: plot_latency(figures, p)),
        ("Throughput against batch size", "throughput.png",
         lambda p: plot_throughput(figures, p)),
        ("Event-to-visible latency distribution", "event-to-visible.png",
         lambda p: plot_visible(raws, p)),
    ]  # fmt: skip
    for title, name, draw in plots:
        path = plot_dir / name
        path.unlink(missing_ok=True)  # never leave a plot of an earlier run behind
        if draw(path):
            made[title] = path
    soak_png = plot_dir / "soak.png"
    soak_png.unlink(missing_ok=True)
    if "soak" in raws and (raw_dir / "soak.png").is_file():
        shutil.copyfile(raw_dir / "soak.png", soak_png)
        made["Soak: RSS, fds, latency and log size against time"] = soak_png
    return made


# ---------------------------------------------------------------------- markdown


def fmt(value: float) -> str:
    """A figure for a table: thousands separated, about four significant digits."""
    size = abs(value)
    if float(value).is_integer() and size < 1e15:
        return f"{int(value):,}"
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 100:
        return f"{value:.1f}"
    if size >= 1 or value == 0:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], rows: Iterable[Iterable[object]], align: str = "") -> list[str]:
    align = align or "l" * len(head)
    rule = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join(rule) + " |"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*out, ""]


_NOT_PARAMS = {"bench", "name", "value", "unit"}


def _params(f: Figure) -> str:
    return ", ".join(f"{k} {fmt(v) if isinstance(v, float) else v}" for k, v in f.items()
                     if k not in _NOT_PARAMS)  # fmt: skip


def _generic(figures: list[Figure]) -> list[str]:
    return _table(["figure", "parameters", "value", "unit"],
                  ([f["name"], _params(f), fmt(f["value"]), f["unit"]] for f in figures),
                  "llrl")  # fmt: skip


def _daemon_table(figures: list[Figure]) -> list[str]:
    def get(name: str, conns: int, ingest: bool, stat: str | None = None) -> str:  # noqa: FBT001
        rows = [f for f in _select(figures, "daemon", name, connections=conns, ingest=ingest)
                if stat is None or f.get("stat") == stat]  # fmt: skip
        return fmt(rows[0]["value"]) if rows else ""

    conns = sorted({f["connections"] for f in _select(figures, "daemon", "rank latency")})
    rows = []
    for c in conns:
        alone = " / ".join(get("rank latency", c, False, s) for s in ("p50", "p99", "p99.9"))
        mixed = " / ".join(get("rank latency", c, True, s) for s in ("p50", "p99", "p99.9"))
        rows.append([c, alone, get("rank throughput", c, False), mixed,
                     get("rank throughput", c, True), get("concurrent ingest held", c, True)])
    head = ["connections", "rank p50 / p99 / p99.9 ms", "rank/s",
            "with ingest: p50 / p99 / p99.9 ms", "rank/s", "ingest held, events/s"]
    rest = [f for f in figures if "connections" not in f or "ingest" not in f]
    return _table(head, rows, "rrrrrr") + _generic(rest)  # fmt: skip


def _kernels_table(figures: list[Figure]) -> list[str]:
    cells: dict[tuple[str, int, int], dict[str, str]] = defaultdict(dict)
    impls: list[str] = []
    for f in _select(figures, "kernels", "latency per call"):
        key = (f["mode"], f["batch"], f["candidates"])
        cell = cells[key].get(f["impl"], "")
        cells[key][f["impl"]] = (f"{fmt(f['value'])} / {cell}" if f["stat"] == "p50"
                                 else f"{cell}{fmt(f['value'])}")  # fmt: skip
        if f["impl"] not in impls:
            impls.append(f["impl"])
    rows = [[mode, f"{b} x {n}", *(cells[mode, b, n].get(i, "") for i in impls)]
            for (mode, b, n) in sorted(cells)]  # fmt: skip
    head = ["mode", "B x N", *(f"{i} p50 / p99 µs" for i in impls)]
    rest = [f for f in figures if f["name"] not in {"latency per call", "users scored per second"}]
    return _table(head, rows, "ll" + "r" * len(impls)) + _generic(rest)


_SPECIAL = {"daemon": _daemon_table, "kernels": _kernels_table}
TITLES = {"eventstore": "Event store", "kernels": "Kernels", "daemon": "Daemon",
          "feeds": "Feeds", "quality": "Model quality", "policies": "Ranking policies (MMR)",
          "online": "Online learning step",
          "soak": "Soak"}  # fmt: skip


def _header(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    commit = results["git_commit"] or "unknown"
    dirty = " with uncommitted changes" if results["git_dirty"] else ""
    mode = ("**quick** (`bench/run --quick`: every benchmark at smoke size, to show that "
            "it runs; the figures are rough and the verdicts are not a fair test of the "
            "targets)" if results["quick"] else "**full** (`bench/run`)")  # fmt: skip
    return [
        "# rerankd benchmark results", "",
        f"Written by `bench/run` on {results['date']}, commit `{commit}`{dirty}; run: {mode}.",
        "",
        (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['os']}; "
         f"Python {m['python']}, jax {m['jax']}, numpy {m['numpy']}."), "",
    ]  # fmt: skip


def _bench_row(name: str, b: dict[str, Any]) -> list[str]:
    def seconds(key: str) -> str:
        return "" if b.get(key) is None else f"{b[key]:.1f}"

    status = b["status"] + (f": {b['error']}" if b.get("error") else "")
    of = f"{b.get('date') or '?'}, {(b.get('git_commit') or '?')[:12]}"
    of += f", {b['mode']}" if b.get("mode") else ""
    command = f"`{b['command']}`" if b.get("command") else "not run by this bench/run"
    return [name, status, seconds("seconds"), seconds("cpu_seconds"), of, command]


def markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    """RESULTS.md: header, benchmarks, targets, plots, then each benchmark's figures."""
    out = _header(results)
    out += ["## Benchmarks", ""]
    out += _table(["benchmark", "status", "wall s", "CPU s", "figures of", "command"],
                  (_bench_row(name, b) for name, b in results["benchmarks"].items()),
                  "llrrll")  # fmt: skip
    out += ["## Targets", ""]
    out += _table(["verdict", "benchmark", "target", "measured"],
                  ([t["verdict"] + (f" ({t['note']})" if t.get("note") else ""), t["bench"],
                    t["target"], t["measured"]] for t in results["targets"]))  # fmt: skip
    if plots:
        out += ["## Plots", ""]
        for title, rel in plots.items():
            out += [f"### {title}", "", f"![{title}]({rel})", ""]
    by_bench: dict[str, list[Figure]] = defaultdict(list)
    for f in results["figures"]:
        by_bench[f["bench"]].append(f)
    for bench, figures in by_bench.items():
        out += [f"## {TITLES.get(bench, bench)}", ""]
        out += _SPECIAL.get(bench, _generic)(figures)
    return "\n".join(out).rstrip() + "\n"
