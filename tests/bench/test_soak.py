"""
bench/soak's smoke run: the soak benchmark runs end to end on real brokers and a real
daemon, and writes the JSON contract that bench/run reads, and the plot (issue 8).
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The contract's fields of one sample, with their JSON types.
SAMPLE_FIELDS = {
    "t_s": float, "rss_mb": float, "fds": int, "queues": dict, "rank_p50_ms": float,
    "rank_p99_ms": float, "ranks": int, "events": int, "rank_errors": int,
    "ingest_errors": int, "log_bytes": int,
}  # fmt: skip
RANK_RATE, EVENT_RATE, SECONDS = 100, 200, 30  # Kafka 80% of the events, MQTT the rest


@pytest.fixture(name="soak", scope="module")
def fixture_soak(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One 30-second soak at low rates into a temporary --out; (out, soak.json)."""
    out = tmp_path_factory.mktemp("soak")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak"), "--minutes", str(SECONDS / 60),
         "--sample-s", "10", "--warmup-minutes", "0.1", "--rank-rate", str(RANK_RATE),
         "--event-rate", str(EVENT_RATE), "--users", "1000",
         # a starved CI machine may stall for seconds; a timeout is not what this checks
         "--timeout-s", "30", "--out", str(out),
         # retention deletes events 12 s old, so the run checks durability across it
         "--retention-minutes", "0.2", "--sweep-s", "2"],
        capture_output=True, text=True, timeout=900, check=False, cwd=ROOT,
    )  # fmt: skip
    assert 0 == done.returncode, done.stdout[-4000:] + done.stderr[-4000:]
    return out, json.loads((out / "soak.json").read_text())


def _numbers(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


@pytest.mark.brokers
def test_samples_follow_the_contract(soak: tuple[Path, dict[str, Any]]) -> None:
    """One sample per 10 s, each with the contract's fields, all numbers finite."""
    _, results = soak
    samples = results["samples"]
    assert [10.0, 20.0, 30.0] == [s["t_s"] for s in samples]
    for sample in samples:
        assert dict.fromkeys(SAMPLE_FIELDS, True) == {
            k: isinstance(sample.get(k), t) for k, t in SAMPLE_FIELDS.items()
        }
        assert all(isinstance(v, int) for v in sample["queues"].values())
        assert {"writer_pending", "kafka_lag", "mqtt_unacked", "rank_batcher"} <= set(
            sample["queues"]
        )
        assert all(math.isfinite(n) for n in _numbers(sample))
        assert sample["rss_mb"] > 0
        assert sample["fds"] > 0
        assert sample["ranks"] > 0
        assert sample["events"] > 0
        assert sample["log_bytes"] > 0
    assert (0.5, RANK_RATE, EVENT_RATE, 0.1) == (
        results["minutes"], results["rank_rate"], results["event_rate"],
        results["warmup_minutes"],
    )  # fmt: skip
    assert {"date", "cpu", "cores", "python", "git_commit"} <= set(results["machine"])


@pytest.mark.brokers
def test_no_errors_and_every_event_durable(soak: tuple[Path, dict[str, Any]]) -> None:
    """
    Zero errors of any kind, and every event the brokers took was logged exactly once,
    although retention deleted the older ones before the end.
    """
    _, results = soak
    assert [(0, 0)] * 3 == [(s["rank_errors"], s["ingest_errors"]) for s in results["samples"]]
    kafka = EVENT_RATE * 4 // 5 * SECONDS
    expected = {"kafka": kafka, "mqtt": EVENT_RATE * SECONDS - kafka}
    assert expected == results["published"]
    logged = results["logged"]
    assert expected == {feed: logged[feed] for feed in expected}
    assert (0, 0, 0, 0) == (logged["missing"], logged["duplicates"], logged["unread"],
                            logged["unpublished"])  # fmt: skip
    # retention ran: the id index forgot deleted events (the log holds impressions too)
    final = results["final_stats"]
    assert final["retention"]["ok"]
    assert final["events"]["indexed_ids"] < EVENT_RATE * SECONDS
    verdicts = {t["target"]: t["verdict"] for t in results["targets"]}
    assert "MET" == verdicts["zero errors"]
    assert "MET" == verdicts["every published event logged exactly once"]
    assert {"MET", "MISSED"} >= set(verdicts.values())
    assert 9 == len(verdicts)


@pytest.mark.brokers
def test_writes_the_plot(soak: tuple[Path, dict[str, Any]]) -> None:
    """soak.png is a PNG image of some size beside soak.json."""
    out, _ = soak
    png = (out / "soak.png").read_bytes()
    assert b"\x89PNG\r\n\x1a\n" == png[:8]
    assert len(png) > 10_000


def test_keeps_the_daemons_log(soak: tuple[Path, dict[str, Any]]) -> None:
    """The daemon's log outlives the run's temporary directory (a stall's only witness)."""
    out, _ = soak
    assert (out / "soak-daemon.log").is_file()


def test_p99_steady_compares_the_thirds_not_two_samples() -> None:
    """One wild minute at either end does not decide "steady"; a drift upwards does."""
    from bench._soak import _p99_ends  # noqa: PLC0415 - bench/ is not a package on the path

    def samples(p99: list[float]) -> list[dict[str, Any]]:
        return [{"rank_p99_ms": v} for v in p99]

    noisy = samples([100, 300, 100, 120, 90, 350, 110, 100, 400])
    drifting = samples([100, 110, 105, 150, 160, 170, 200, 210, 220])

    assert (100.0, 110.0) == _p99_ends(noisy)
    assert (105.0, 210.0) == _p99_ends(drifting)
    assert (5.0, 7.0) == _p99_ends(samples([5, 7]))


def test_the_log_tail_finds_gaps_doubles_and_strangers(tmp_path: Path) -> None:
    """LogTail marks K<n>/M<n> as the log grows and counts what it cannot vouch for."""
    from bench._soak import LogTail  # noqa: PLC0415 - bench/ is not a package on the path

    db = tmp_path / "events.db"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TABLE events (log_offset INTEGER PRIMARY KEY, id TEXT)")
        conn.executemany("INSERT INTO events VALUES (?, ?)",
                         [(1, "K0"), (2, "M0"), (3, "K1"), (4, "K2"), (5, "M1")])
    tail = LogTail(db)
    assert 5 == tail.read()
    assert {"kafka": 3, "mqtt": 2, "missing": 0, "duplicates": 0, "unread": 0,
            "unpublished": 0, "other": 0} == tail.verdict({"kafka": 3, "mqtt": 2})
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DELETE FROM events WHERE log_offset <= 4")  # retention: already read
        conn.executemany("INSERT INTO events VALUES (?, ?)",
                         [(6, "K3"), (7, "K1"), (9, "x-1"), (10, "K900")])  # 8: deleted unread
    assert 4 == tail.read()
    assert 0 == tail.read()
    # published K0..K5: K4 and K5 missing, K1 twice, K900 never acknowledged
    assert {"kafka": 4, "mqtt": 2, "missing": 2, "duplicates": 1, "unread": 1,
            "unpublished": 1, "other": 1} == tail.verdict({"kafka": 6, "mqtt": 2})


def test_the_warm_up_waits_for_the_log_to_reach_its_retained_size() -> None:
    """With retention the default warm-up is at least its age + 1 min; too short: refused."""
    from bench._soak import parse_args  # noqa: PLC0415 - bench/ is not a package on the path

    assert 4.0 == parse_args("", ["--minutes", "30"]).warmup_minutes  # 3-min retention
    assert 3.0 == parse_args("", ["--minutes", "30", "--retention-minutes", "0"]).warmup_minutes
    assert 6.0 == parse_args("", ["--minutes", "60", "--retention-minutes", "2"]).warmup_minutes
    with pytest.raises(SystemExit):
        parse_args("", ["--minutes", "3", "--sample-s", "15"])  # 4 min of warm-up
    with pytest.raises(SystemExit):  # rows must outlive a sample to be read
        parse_args("", ["--retention-minutes", "0.5", "--sample-s", "60"])


def test_a_generator_dies_with_its_parent() -> None:
    """A killed soak leaves no generator running (they once kept loading the machine)."""
    child = ("import sys, time; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
             "from _soakload import die_with_parent; die_with_parent(); "
             "print('ready', flush=True); time.sleep(60)")  # fmt: skip
    parent_code = ("import subprocess, sys; "
                   f"p = subprocess.Popen([sys.executable, '-c', {child!r}, *sys.argv[1:]]); "
                   "print(p.pid, flush=True); p.wait()")  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", parent_code, str(ROOT / "bench"), str(ROOT)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    assert "ready" == parent.stdout.readline().strip()
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's reaper may be slow to collect it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in {"Z", "X"}
