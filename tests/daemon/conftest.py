"""
Fixtures for the daemon's tests: a real `rerankd run` process on a temporary
directory with a real NOTIFY_SOCKET, and the `rerankd` command line as a process.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import ROOT, Daemon


@pytest.fixture(name="start")
def fixture_start(tmp_path: Path) -> Iterator[Any]:
    """start(config="") runs a daemon on tmp_path, waits for READY=1, and returns it."""
    daemons: list[Daemon] = []

    def start(config: str = "", **kwargs: Any) -> Daemon:
        daemon = Daemon(tmp_path, config, **kwargs)
        daemons.append(daemon)
        daemon.wait_for("READY=1")
        return daemon

    yield start
    for daemon in daemons:
        daemon.close()


@pytest.fixture(name="shared_daemon", scope="module")
def fixture_shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for a whole test module; its tests keep apart by using their own ids."""
    daemon = Daemon(tmp_path_factory.mktemp("daemon"))
    try:
        daemon.wait_for("READY=1")
        yield daemon
    finally:
        daemon.close()


@pytest.fixture(name="rerankd")
def fixture_rerankd() -> Callable[..., subprocess.CompletedProcess[str]]:
    """rerankd(cwd, *args, stdin=None) runs the command line as a process and returns it."""

    def rerankd(
        cwd: Path, *args: str, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", *args], cwd=cwd, input=stdin,
            capture_output=True, text=True, timeout=120, check=False,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
        )  # fmt: skip

    return rerankd
