"""The plugin tests' real daemons: one data directory, kept across restarts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemons import Daemon


@pytest.fixture(name="start")
def fixture_start(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """
    start(config) runs a daemon on tmp_path (data kept across starts), waits for READY=1.

    ``config`` follows an open ``[ranking]`` table (no training at start): it may begin
    with more ``[ranking]`` keys.
    """
    started: list[Daemon] = []

    def start(config: str = "") -> Daemon:
        daemon = Daemon(tmp_path, "[ranking]\ntrain_on_start = false\n" + config)
        started.append(daemon)
        daemon.wait_for("READY=1")
        return daemon

    yield start
    for daemon in started:
        daemon.close()
