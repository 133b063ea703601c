"""The rerankd command line, run as a real process: the offline commands, check-config, demo."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.client import Client
from daemon.config import load_config

SHARED_ML = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "ml-100k"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(name="events_file")
def fixture_events_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text("".join(f"{u} {i}\n" for u in range(1, 4) for i in range(10, 16)))
    return path


def test_import_then_summary(tmp_path: Path, events_file: Path, rerankd: Any) -> None:
    """import appends to ./var and summary reports the folded state as JSON."""
    done = rerankd(tmp_path, "import", str(events_file), "--format", "sasrec")
    assert done.returncode == 0, done.stderr
    assert "imported 18 events (0 already in the log)" in done.stdout
    summary = json.loads(rerankd(tmp_path, "summary", "--json").stdout)
    assert (summary["users"], summary["items"], summary["interactions"]) == (3, 6, 18)
    assert summary["log"]["events"] == 18
    assert (tmp_path / "var" / "events.db").exists()


def test_user_and_forget_offline(tmp_path: Path, events_file: Path, rerankd: Any) -> None:
    """With --offline, user and forget open the store of a stopped daemon directly."""
    rerankd(tmp_path, "import", str(events_file), "--format", "sasrec")
    view = json.loads(rerankd(tmp_path, "user", "2", "--offline", "--json").stdout)
    assert [r["item"] for r in view["recent"]] == ["15", "14", "13", "12", "11", "10"]
    done = rerankd(tmp_path, "forget", "2", "--yes", "--offline")
    assert "erased: 6 events deleted" in done.stdout
    gone = rerankd(tmp_path, "user", "2", "--offline")
    assert gone.returncode == 1
    assert gone.stderr == "rerankd: user: not in the state (never seen, or forgotten)\n"


def test_bad_config_is_one_line_and_exit_1(tmp_path: Path, rerankd: Any) -> None:
    """A config mistake is reported on stderr as one line naming file and key, exit 1."""
    (tmp_path / "c.toml").write_text("[store]\nbogus = 1\n")
    done = rerankd(tmp_path, "summary", "--config", "c.toml")
    assert done.returncode == 1
    assert done.stderr.startswith("rerankd: c.toml: [store].bogus: unknown key; known: data_dir,")
    assert len(done.stderr.splitlines()) == 1


# ---------------------------------------------------------------------- check-config

_CONFIG = """\
[server]
max_in_flight = 8
[fold.weights]
view = 0.5
[ranking]
batch_buckets = [1, 8, 64]
"""


def test_check_config_prints_the_effective_config(tmp_path: Path, rerankd: Any) -> None:
    """check-config prints every key with its value; the output loads back to the same config."""
    (tmp_path / "c.toml").write_text(_CONFIG)
    done = rerankd(tmp_path, "check-config", "--config", "c.toml")
    assert done.returncode == 0, done.stderr
    assert "max_in_flight = 8" in done.stdout.splitlines()
    assert "keep_snapshots = 2" in done.stdout.splitlines()  # a default, filled in
    (tmp_path / "effective.toml").write_text(done.stdout)
    effective, original = load_config(tmp_path / "effective.toml"), load_config(tmp_path / "c.toml")
    assert dataclasses.replace(original, source="") == dataclasses.replace(effective, source="")


def test_check_config_json(tmp_path: Path, rerankd: Any) -> None:
    """check-config --json gives every section as an object, and the file it came from."""
    (tmp_path / "c.toml").write_text(_CONFIG)
    config = json.loads(rerankd(tmp_path, "check-config", "--config", "c.toml", "--json").stdout)
    assert (config["source"], config["server"]["max_in_flight"]) == ("c.toml", 8)
    assert (config["fold"]["weights"]["view"], config["fold"]["weights"]["purchase"]) == (0.5, 5.0)
    assert config["ranking"]["model_path"] is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[server]\nbogus = 1\n", "[server].bogus: unknown key; known: "),
        ('[ranking]\nmax_batch = "big"\n', "[ranking].max_batch: expected int"),
    ],
    ids=["unknown-key", "wrong-type"],
)
def test_check_config_names_the_bad_key(
    tmp_path: Path, rerankd: Any, text: str, problem: str
) -> None:
    """A bad config makes check-config print one line naming the file and the key, exit 1."""
    (tmp_path / "c.toml").write_text(text)
    done = rerankd(tmp_path, "check-config", "--config", "c.toml")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith(f"rerankd: c.toml: {problem}")
    assert len(done.stderr.splitlines()) == 1


# ------------------------------------------------------------------------------ demo


@pytest.mark.skipif(not SHARED_ML.exists(), reason="the shared MovieLens 100K copy is absent")
def test_demo_imports_movielens(tmp_path: Path, rerankd: Any) -> None:
    """demo --no-serve imports MovieLens 100K, prints the summary and how to query."""
    done = rerankd(tmp_path, "demo", "--dataset", str(SHARED_ML), "--no-serve")
    assert done.returncode == 0, done.stderr
    assert "imported 101682 new events" in done.stdout
    assert "users               943" in done.stdout
    assert "rerankd rank 1 50 181 100" in done.stdout
    again = rerankd(tmp_path, "demo", "--dataset", str(SHARED_ML), "--no-serve")
    assert "imported 0 new events" in again.stdout


def test_demo_serves_what_it_imported(tmp_path: Path, events_file: Path, rerankd: Any) -> None:
    """demo (the README's main job) imports, then serves it on ./var/; SIGTERM stops it."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "demo", "--dataset", str(events_file),
         "--format", "sasrec"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    try:
        _wait_for_socket(tmp_path / "var" / "rerankd.sock", demo)
        # the imported history is old, its popularity long decayed: a purchase now decides
        purchase = {"id": "p-1", "type": "purchase", "user": "2", "item": "12", "ts": time.time()}
        rerankd(tmp_path, "ingest", stdin=json.dumps(purchase))
        done = rerankd(tmp_path, "rank", "1", "11", "12")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[1].split()[:2] == ["1", "12"]
        demo.send_signal(signal.SIGTERM)
        output, _ = demo.communicate(timeout=60)
    finally:
        demo.kill()
    assert demo.returncode == 0, output
    assert "imported 18 new events" in output
    assert "query it from another terminal" in output


def _wait_for_socket(path: Path, proc: subprocess.Popen[str], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            with Client(path, timeout_s=5) as client:
                if client.request("health")["ok"]:
                    return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"no daemon answered on {path} within {timeout_s} s")
