"""
A real `rerankd run` child process on a temporary directory, with a real NOTIFY_SOCKET:
what the daemon and feed tests start. Imported as ``daemons`` (``tests/`` is on
``sys.path`` because of the root ``conftest.py``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.client import Client, RequestFailedError

__all__ = ["ROOT", "Daemon", "poll", "user_view"]

ROOT = Path(__file__).resolve().parents[1]


def poll(read: Callable[[], Any], done: Callable[[Any], bool], timeout_s: float = 120.0) -> Any:
    """``read()`` every 0.1 s until ``done(value)`` or the timeout; the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


class Daemon:
    """A `rerankd run` child process and what it told systemd."""

    def __init__(
        self, tmp: Path, config: str = "", *, listen_fd: int | None = None,
        socket_dir: Path | None = None, python_path: tuple[Path, ...] = (), store: str = "",
    ) -> None:  # fmt: skip
        """
        ``python_path``: more directories on the daemon's PYTHONPATH (after the checkout).

        ``store``: more ``[store]`` keys (TOML lines), since ``config`` cannot repeat
        the ``[store]`` table that holds ``data_dir``.
        """
        self.tmp = tmp
        self.socket_path = (socket_dir or tmp) / "rerankd.sock"
        self.config = tmp / "rerankd.toml"
        self.config.write_text(
            f'[store]\ndata_dir = "{tmp / "data"}"\n{store}'
            f'[server]\nsocket_path = "{self.socket_path}"\n{config}'
        )
        self.notify_path = tmp / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            self.notify_path.unlink()
        self.notify.bind(str(self.notify_path))
        self.messages: list[str] = []
        self.stdout = (tmp / "daemon.log").open("ab")
        env = {"PATH": os.environ["PATH"],
               "PYTHONPATH": os.pathsep.join(map(str, (ROOT, *python_path))),
               "NOTIFY_SOCKET": str(self.notify_path), "JAX_PLATFORMS": "cpu"}  # fmt: skip
        command = [sys.executable, "-m", "daemon.cli", "run", "--config", str(self.config)]
        pass_fds: tuple[int, ...] = ()
        if listen_fd is not None:  # systemd's hand-over: fd 3, LISTEN_PID = the daemon's pid
            script = (
                "import os, sys; os.dup2(int(sys.argv[1]), 3); "
                "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
                "os.execv(sys.argv[2], sys.argv[2:])"
            )
            command = [sys.executable, "-c", script, str(listen_fd), *command]
            pass_fds = (listen_fd,)
        self.proc = subprocess.Popen(
            command, cwd=tmp, env=env, stdout=self.stdout, stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
        )  # fmt: skip

    def wait_for(self, message: str, timeout_s: float = 120.0) -> None:
        """Block until the daemon sent ``message`` (e.g. READY=1) to NOTIFY_SOCKET."""
        deadline = time.monotonic() + timeout_s
        while not any(message in m for m in self.messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                log = (self.tmp / "daemon.log").read_text()[-3000:]
                pytest.fail(f"no {message} (exit {self.proc.poll()}); log:\n{log}")
            self.notify.settimeout(min(remaining, 1.0))
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.notify.recv(4096).decode())

    def received(self) -> str:
        """Everything sent to NOTIFY_SOCKET so far, including what is still queued."""
        self.notify.setblocking(False)  # noqa: FBT003
        with contextlib.suppress(BlockingIOError):
            while True:
                self.messages.append(self.notify.recv(4096).decode())
        return "\n".join(self.messages)

    def client(self) -> Client:
        return Client(self.socket_path, timeout_s=30)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            # its stopping_slow warnings and (after 30 s) every thread's stack are there
            log = (self.tmp / "daemon.log").read_text(errors="replace")[-8000:]
            pytest.fail(f"no exit within 60 s of signal {sig}; log:\n{log}")
        self.stdout.close()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stdout.close()
        self.notify.close()


def user_view(daemon: Daemon, user: str) -> dict[str, Any] | None:
    """The daemon's ``user`` answer for ``user``, or None when it does not know the user."""
    with daemon.client() as client:
        try:
            view: dict[str, Any] = client.request("user", user=user)["user"]
        except RequestFailedError as error:
            if error.code != "not_found":
                raise
            return None
    return view
