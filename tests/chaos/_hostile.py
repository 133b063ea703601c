"""
Helpers of the hostile-client tests: a real daemon with a world-reachable socket, the
daemon's RSS and file descriptors as /proc shows them, raw connections, and a
well-behaved client that runs in its own process and reports its latencies.

The well-behaved client is a child process (``python _hostile.py SOCKET``), not a
thread of the test: the hostile clients run in the test process, and a thread beside
them would measure the test's own GIL contention instead of the daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daemon.client import Client

__all__ = [
    "WellBehaved",
    "connect",
    "daemon_rss_kib",
    "daemon_sockets",
    "nofile_limit",
    "public_dir",
    "raise_nofile",
    "read_lines",
    "stats",
    "well_behaved",
]

_HERE = Path(__file__).resolve()
_ROOT = _HERE.parents[2]


def daemon_rss_kib(pid: int) -> int:
    """The process's resident set (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    msg = f"/proc/{pid}/status has no VmRSS"
    raise AssertionError(msg)


def daemon_sockets(pid: int) -> int:
    """
    How many sockets the process holds open (its other descriptors, SQLite readers that
    worker threads open on first use, come and go with the threads, not with clients).
    """
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while we look
            count += fd.readlink().name.startswith("socket:")
    return count


def nofile_limit(pid: int) -> int:
    """The process's soft RLIMIT_NOFILE (from /proc/<pid>/limits)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    msg = f"/proc/{pid}/limits has no 'Max open files'"
    raise AssertionError(msg)


def raise_nofile(at_least: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to ``at_least`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= at_least:
        return
    if hard != resource.RLIM_INFINITY and hard < at_least:
        if os.getuid() != 0:
            msg = f"RLIMIT_NOFILE: hard limit {hard} < {at_least}; raise it or run as root"
            raise AssertionError(msg)
        hard = at_least
    resource.setrlimit(resource.RLIMIT_NOFILE, (at_least, hard))


@contextlib.contextmanager
def public_dir() -> Iterator[Path]:
    """A fresh directory every user may search (pytest's tmp_path is private to its owner)."""
    with tempfile.TemporaryDirectory(prefix="rerankd-chaos-") as path:
        Path(path).chmod(0o755)
        yield Path(path)


def connect(path: Path, *, timeout_s: float = 30.0) -> socket.socket:
    """
    A raw connection to the daemon's socket, with ``timeout_s`` on every operation.

    A Unix socket with a timeout is non-blocking underneath, and its connect fails with
    EAGAIN while the listen backlog is full: retried until ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)
        except OSError:
            sock.close()
            raise
        else:
            return sock


def read_lines(sock: socket.socket, *, timeout_s: float) -> tuple[list[dict[str, Any]], bool]:
    """
    Every answer line until the daemon closes the connection or ``timeout_s`` passes.

    Returns the decoded lines and whether the connection was closed by the daemon (end
    of file, or a reset after it closed with our bytes unread).
    """
    deadline = time.monotonic() + timeout_s
    data = bytearray()
    closed = False
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            break
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    lines = [json.loads(line) for line in bytes(data).splitlines() if line.strip()]
    return lines, closed


def stats(path: Path) -> dict[str, Any]:
    """The daemon's ``stats`` answer, on a connection of its own."""
    with Client(path, timeout_s=30) as client:
        return client.request("stats")


class WellBehaved:
    """
    A client in its own process: ranks (and now and then ingests) in a loop.

    Start it with `well_behaved`; `finish` stops it and returns its report:
    ``latencies_s`` of every rank, ``failures`` (any error, timeout or unexpected
    answer), ``ingested`` (ids acknowledged).
    """

    def __init__(self, socket_path: Path) -> None:
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(_ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, str(_HERE), str(socket_path)], env=env, cwd=_ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if first.strip() != b"ready":
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            msg = f"the well-behaved client did not start: {first!r} {err[-2000:]}"
            raise AssertionError(msg)

    def finish(self) -> dict[str, Any]:
        """Stop the client; its report."""
        out, err = self.proc.communicate(b"stop\n", timeout=120)
        if self.proc.returncode != 0:
            msg = f"the well-behaved client failed ({self.proc.returncode}): {err.decode()[-2000:]}"
            raise AssertionError(msg)
        report: dict[str, Any] = json.loads(out)
        latencies = sorted(report["latencies_s"])
        report["p99_s"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        report["max_s"] = latencies[-1]
        return report

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def well_behaved(socket_path: Path) -> Iterator[WellBehaved]:
    """A running `WellBehaved` client, killed on the way out if the test did not finish it."""
    client = WellBehaved(socket_path)
    try:
        yield client
    finally:
        client.kill()


def _well_behaved_main(socket_path: str) -> None:
    """The child: rank every few ms until stdin says stop, then print the report as JSON."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    candidates = [f"wb-item-{k}" for k in range(100)]
    latencies: list[float] = []
    failures: list[str] = []
    ingested: list[str] = []
    client: Client | None = None
    n = 0
    while not stop.is_set():
        n += 1
        try:
            if client is None:
                client = Client(socket_path, timeout_s=20)
            started = time.perf_counter()
            answer = client.request("rank", user="wb-user", candidates=candidates, k=10)
            latencies.append(time.perf_counter() - started)
            if len(answer["items"]) != 10 or not set(answer["items"]) <= set(candidates):
                failures.append(f"rank answered {answer!r}")
            if n % 10 == 0:
                event = {"id": f"wb-{os.getpid()}-{n}", "type": "click", "user": "wb-user",
                         "item": candidates[n % 100], "ts": time.time()}  # fmt: skip
                ack = client.request("ingest", events=[event])
                if ack["accepted"] != 1:
                    failures.append(f"ingest answered {ack!r}")
                else:
                    ingested.append(event["id"])
            if n == 1:
                sys.stdout.write("ready\n")
                sys.stdout.flush()
        except Exception as error:  # noqa: BLE001 - every failure is reported, none hidden
            failures.append(f"{type(error).__name__}: {error}")
            if client is not None:
                client.close()
            client = None
            if n == 1:
                sys.stdout.write(f"failed {error}\n")
                sys.stdout.flush()
                return
        time.sleep(0.005)
    sys.stdout.write(json.dumps({"latencies_s": latencies, "failures": failures,
                                 "ingested": ingested}))  # fmt: skip


if __name__ == "__main__":
    _well_behaved_main(sys.argv[1])
