"""The rerankd command line, run as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_ML = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "ml-100k"


def rerankd(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[2])})


@pytest.fixture(name="events_file")
def fixture_events_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text("".join(f"{u} {i}\n" for u in range(1, 4) for i in range(10, 16)))
    return path


def test_import_then_summary(tmp_path: Path, events_file: Path) -> None:
    """import appends to ./var and summary reports the folded state as JSON."""
    done = rerankd(tmp_path, "import", str(events_file), "--format", "sasrec")
    assert done.returncode == 0, done.stderr
    assert "imported 18 events (0 already in the log)" in done.stdout
    summary = json.loads(rerankd(tmp_path, "summary", "--json").stdout)
    assert (summary["users"], summary["items"], summary["interactions"]) == (3, 6, 18)
    assert summary["log"]["events"] == 18
    assert (tmp_path / "var" / "events.db").exists()


def test_user_and_forget(tmp_path: Path, events_file: Path) -> None:
    """user shows a user's recent items; forget erases the user."""
    rerankd(tmp_path, "import", str(events_file), "--format", "sasrec")
    view = json.loads(rerankd(tmp_path, "user", "2").stdout)
    assert [r["item"] for r in view["recent"]] == ["15", "14", "13", "12", "11", "10"]
    done = rerankd(tmp_path, "forget", "2", "--yes")
    assert "erased: 6 events deleted" in done.stdout
    gone = rerankd(tmp_path, "user", "2")
    assert gone.returncode == 1
    assert "user: not in the state" in gone.stderr


def test_bad_config_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """A config mistake is reported on stderr without a traceback."""
    (tmp_path / "c.toml").write_text("[store]\nbogus = 1\n")
    done = rerankd(tmp_path, "summary", "--config", "c.toml")
    assert done.returncode == 1
    assert done.stderr.strip() == ("Error: c.toml: [store].bogus: unknown key; known: data_dir, "
                                   "keep_snapshots, snapshot_every_events, synchronous")


@pytest.mark.skipif(not SHARED_ML.exists(), reason="the shared MovieLens 100K copy is absent")
def test_demo_imports_movielens(tmp_path: Path) -> None:
    """demo (the README's main job) imports MovieLens 100K and prints the summary."""
    done = rerankd(tmp_path, "demo", "--dataset", str(SHARED_ML))
    assert done.returncode == 0, done.stderr
    assert "imported 101682 new events" in done.stdout
    assert "users               943" in done.stdout
    again = rerankd(tmp_path, "demo", "--dataset", str(SHARED_ML))
    assert "imported 0 new events" in again.stdout
