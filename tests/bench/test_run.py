"""
bench/run, the benchmark runner: it runs, writes its files, reports what failed.

CI checks that the runner works, not the figures: ``bench/run --quick`` runs every
benchmark at smoke size (real daemons, real Kafka and Mosquitto, a short training on
../shared/datasets/ml-100k) into a temporary directory, never into the repository's
bench/.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "run"
#: the model-quality smoke trains on MovieLens 100K; where the shared data is not beside
#: the checkout (as other data tests skip then), --quick runs the other four only
DATASETS = Path(os.environ.get("RERANKD_DATASETS") or ROOT.parent / "shared" / "datasets")
HAVE_DATA = (DATASETS / "ml-100k" / "u.data").is_file()
QUICK = {"eventstore", "kernels", "daemon", "feeds", "online"} | (
    {"quality"} if HAVE_DATA else set())  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: the summary's target lines: "  VERDICT  BENCH  TARGET  ->  MEASURED[  [NOTE]]"
TARGET_LINE = re.compile(r"^  (MET|MISSED) +(\S+) +(.*?)  ->  (.*?)(?:  \[(.*)\])?$")


def run_bench(out: Path, *args: str, env: dict[str, str] | None = None,
              timeout: float = 900) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        [sys.executable, str(RUN), *args, "--out", str(out)], check=False, cwd=ROOT, text=True,
        capture_output=True, timeout=timeout,
        env=os.environ | {"PYTHONDONTWRITEBYTECODE": "1"} | (env or {}),
    )  # fmt: skip


#: where bench/run writes by default (its results, plots, and the benchmarks' raw files)
OUTPUTS = ("bench/out", "bench/results", "bench/results.json", "bench/RESULTS.md")


def bench_tree() -> dict[str, int | None]:
    """
    Every file under the repository's bench/ (caches aside), with its mtime where
    bench/run writes by default (the sources' mtimes are left out: edits are not the
    runner's).
    """
    return {rel: p.stat().st_mtime_ns if rel.startswith(OUTPUTS) else None
            for p in (ROOT / "bench").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
            and (rel := str(p.relative_to(ROOT)))}  # fmt: skip


def printed_targets(stdout: str) -> list[dict[str, str]]:
    """The targets of the runner's final summary, as results.json states them."""
    lines = stdout.split("\ntargets:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    out = []
    for line in lines:
        match = TARGET_LINE.match(line)
        assert match, f"not a target line: {line!r}"
        verdict, bench, target, measured, note = match.groups()
        row = {"bench": bench, "target": target, "measured": measured, "verdict": verdict}
        out.append(row | ({"note": note} if note else {}))
    return out


def linked_images(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def figure(results: dict[str, Any], bench: str, name: str, **params: Any) -> list[dict[str, Any]]:
    return [f for f in results["figures"] if f["bench"] == bench and f["name"] == name
            and all(f.get(k) == v for k, v in params.items())]  # fmt: skip


@pytest.fixture(name="quick_run", scope="module")
def fixture_quick_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str], dict[str, int | None]]:
    """One `bench/run --quick` into a temporary directory, and bench/ before it."""
    out = tmp_path_factory.mktemp("bench-run")
    before = bench_tree()
    only = () if HAVE_DATA else ("--only", ",".join(sorted(QUICK)))
    done = run_bench(out, "--quick", *only)
    return out, done, before


@pytest.mark.slow
def test_quick_run_succeeds_and_writes_results(
    quick_run: tuple[Path, subprocess.CompletedProcess[str], dict[str, int | None]],
) -> None:
    """--quick runs every benchmark (exit 0) and results.json holds what the issue lists."""
    out, done, _ = quick_run
    assert done.returncode == 0, f"bench/run --quick failed:\n{done.stdout[-6000:]}\n{done.stderr}"
    results = json.loads((out / "results.json").read_text())
    assert {"cpu", "cores", "memory_gib", "python", "jax", "os"} <= results["machine"].keys()
    assert all(results["machine"][k] for k in ("cpu", "cores", "python", "jax", "os"))
    assert dt.datetime.fromisoformat(results["date"]).tzinfo is not None
    assert re.fullmatch(r"[0-9a-f]{40}", results["git_commit"])
    assert isinstance(results["git_dirty"], bool)
    assert results["quick"] is True
    assert QUICK == set(results["benchmarks"])
    for name, b in results["benchmarks"].items():
        assert b["status"] == "ok", f"{name}: {b}"
        assert b["seconds"] > 0
        assert b["command"]
        assert (out / "out" / f"{name}.json").is_file()


@pytest.mark.slow
def test_quick_run_figures_have_values_and_units(
    quick_run: tuple[Path, subprocess.CompletedProcess[str], dict[str, int | None]],
) -> None:
    """Every figure has a finite value and a unit, every benchmark has figures."""
    out, done, _ = quick_run
    assert done.returncode == 0, done.stdout[-3000:]
    results = json.loads((out / "results.json").read_text())
    for f in results["figures"]:
        assert isinstance(f["value"], (int, float)), f
        assert math.isfinite(f["value"]), f
        assert isinstance(f["unit"], str), f
        assert f["unit"], f
        assert f["name"], f
    assert QUICK == {f["bench"] for f in results["figures"]}
    # the figures the plots are drawn from, with the parameters that identify them
    for ingest in (False, True):
        conns = {f["connections"] for f in
                 figure(results, "daemon", "rank latency", stat="p99.9", ingest=ingest)}
        assert {1, 8, 32, 128} == conns
    batches = {f["batch"] for f in figure(results, "kernels", "users scored per second",
                                          impl="rerankd", mode="full")}  # fmt: skip
    assert {1, 16, 64} == batches
    for feed in ("socket", "kafka", "mqtt"):
        assert len(figure(results, figure_bench(feed), "event to visible", feed=feed)) == 3


def figure_bench(feed: str) -> str:
    return "daemon" if feed == "socket" else "feeds"


@pytest.mark.slow
def test_quick_run_markdown_links_real_plots(
    quick_run: tuple[Path, subprocess.CompletedProcess[str], dict[str, int | None]],
) -> None:
    """RESULTS.md exists, links the three plots, and each linked file is a PNG."""
    out, done, _ = quick_run
    assert done.returncode == 0, done.stdout[-3000:]
    markdown = (out / "RESULTS.md").read_text()
    links = linked_images(markdown)
    assert {"results/daemon-latency.png", "results/throughput.png",
            "results/event-to-visible.png"} <= set(links)  # fmt: skip
    for link in links:
        assert (out / link).read_bytes()[:8] == PNG_MAGIC, link
    assert "## Targets" in markdown


@pytest.mark.slow
def test_quick_run_prints_the_targets_of_results_json(
    quick_run: tuple[Path, subprocess.CompletedProcess[str], dict[str, int | None]],
) -> None:
    """The verdicts printed at the end are results.json's, one for one, in order."""
    out, done, _ = quick_run
    assert done.returncode == 0, done.stdout[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["targets"], "no targets at all"
    assert {t["verdict"] for t in results["targets"]} <= {"MET", "MISSED"}
    assert results["targets"] == printed_targets(done.stdout)
    assert f"wrote {out / 'results.json'}" in done.stdout


@pytest.mark.slow
def test_quick_run_leaves_the_repository_alone(
    quick_run: tuple[Path, subprocess.CompletedProcess[str], dict[str, int | None]],
) -> None:
    """With --out, no file under the repository's bench/ is created or (re)written."""
    _, done, before = quick_run
    assert done.returncode == 0, done.stdout[-3000:]
    assert before == bench_tree()


def test_a_failed_benchmark_is_reported_and_the_others_run(tmp_path: Path) -> None:
    """A benchmark that fails (no data set) fails the run, named; the next one still runs."""
    missing = {"RERANKD_DATASETS": str(tmp_path / "no-datasets")}
    done = run_bench(tmp_path, "--quick", "--only", "quality,eventstore", env=missing,
                     timeout=600)  # fmt: skip
    assert 1 == done.returncode, done.stdout[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    quality, eventstore = results["benchmarks"]["quality"], results["benchmarks"]["eventstore"]
    assert "failed" == quality["status"]
    assert "exit status 1" == quality["error"]
    assert "no ml-100k under" in done.stdout
    assert "ok" == eventstore["status"]
    assert {"eventstore"} == {f["bench"] for f in results["figures"]}
    assert "failed: quality" in done.stdout
    assert (tmp_path / "RESULTS.md").is_file()


def soak_json() -> dict[str, Any]:
    """A soak.json as bench/soak writes it (the contract's keys, two samples)."""
    sample = {"t_s": 60.0, "rss_mb": 900.0, "fds": 40, "queues": {"writer_pending": 0},
              "rank_p50_ms": 0.8, "rank_p99_ms": 3.0, "ranks": 60_000, "events": 300_000,
              "rank_errors": 0, "ingest_errors": 0, "log_bytes": 2**30}  # fmt: skip
    later = sample | {"t_s": 120.0, "rss_mb": 910.0, "fds": 41, "rank_p99_ms": 4.0}
    return {
        "minutes": 2.0, "rank_rate": 1000, "event_rate": 5000, "warmup_minutes": 0.5,
        "samples": [sample, later],
        "targets": [{"target": "RSS flat within 5% after warm-up", "measured": "1.11%",
                     "verdict": "MET"},
                    {"target": "zero errors", "measured": "0", "verdict": "MET"}],
        "machine": {"date": "2026-11-29T03:00:00+00:00", "git_commit": "a" * 40, "cores": 2},
    }  # fmt: skip


def test_report_includes_the_soak_with_its_own_date(tmp_path: Path) -> None:
    """--report gathers bench/soak's soak.json and soak.png, marked with the soak's run."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "soak.json").write_text(json.dumps(soak_json()))
    (tmp_path / "out" / "soak.png").write_bytes(PNG_MAGIC + b"\0" * 64)
    done = run_bench(tmp_path, "--report", timeout=120)
    assert 0 == done.returncode, done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    soak = results["benchmarks"]["soak"]
    assert ("earlier", "2026-11-29T03:00:00+00:00", "a" * 40) == (
        soak["status"], soak["date"], soak["git_commit"])
    rss = figure(results, "soak", "daemon RSS", stat="last")
    assert [910.0] == [f["value"] for f in rss]
    assert ["MB"] == [f["unit"] for f in rss]
    assert [120_000] == [f["value"] for f in figure(results, "soak", "ranks answered")]
    assert ["RSS flat within 5% after warm-up", "zero errors"] == [
        t["target"] for t in results["targets"] if t["bench"] == "soak"]
    assert "results/soak.png" in linked_images((tmp_path / "RESULTS.md").read_text())
    assert (tmp_path / "results" / "soak.png").read_bytes()[:8] == PNG_MAGIC
    assert results["targets"] == printed_targets(done.stdout)
