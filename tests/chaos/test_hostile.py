"""
Hostile clients against one real daemon: oversized lines, half-open, non-reading and
slow connections, thousands of connections, and a peer whose uid is not allowed.

Each test runs a well-behaved client in its own process while the hostile ones act,
and asserts that it was served without a failure and promptly (its rank p99), and
that the daemon's memory (VmRSS) and sockets come back: the hostile round is
repeated and the growth from the first round to the last stays under a bound far below
what the hostile clients sent, so the figure is flat, not merely small.

The bounds are generous (CI shares 2 cores with other tests); what they catch is a
stall (seconds) or a leak (the hostile traffic's size), not a slow machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _hostile import (
    connect,
    daemon_rss_kib,
    daemon_sockets,
    nofile_limit,
    public_dir,
    raise_nofile,
    read_lines,
    stats,
    well_behaved,
)
from daemons import Daemon, poll

from daemon.client import Client

pytestmark = pytest.mark.chaos

MAX_LINE_BYTES = 256 * 1024
MAX_CONNECTIONS = 500
IDLE_TIMEOUT_S = 2.0
WRITE_TIMEOUT_S = 3.0
ALLOWED_UID = 4242  # any uid without a passwd entry will do: SO_PEERCRED reports numbers
NOBODY = 65534
CONFIG = f"""\
socket_mode = 0o666
allowed_uids = [{ALLOWED_UID}]
max_line_bytes = {MAX_LINE_BYTES}
max_connections = {MAX_CONNECTIONS}
idle_timeout_s = {IDLE_TIMEOUT_S}
write_timeout_s = {WRITE_TIMEOUT_S}
"""
#: The well-behaved client's rank p99 while hostile clients act (about 2 ms when idle).
P99_BOUND_S = 0.5
#: Any single rank of the well-behaved client (a stall would be seconds).
MAX_BOUND_S = 3.0
#: RSS growth allowed from the first hostile round to the last.
FLAT_KIB = 16 * 1024
#: How long the daemon may take to close what its timeouts must close, beyond them.
SLACK_S = 10.0


@pytest.fixture(name="daemon", scope="module")
def fixture_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """
    One daemon for the module, with small limits and timeouts, its socket world-reachable.

    RLIMIT_NOFILE is raised before the start, so the daemon (which inherits it) can hold
    max_connections and the test its 2,000 connections.
    """
    raise_nofile(8192)
    with public_dir() as socket_dir:
        daemon = Daemon(tmp_path_factory.mktemp("hostile"), CONFIG, socket_dir=socket_dir)
        try:
            daemon.wait_for("READY=1")
            yield daemon
        finally:
            daemon.close()


def _assert_served(report: dict[str, Any]) -> None:
    """The well-behaved client was served throughout: no failure, no stall."""
    assert [] == report["failures"]
    assert len(report["latencies_s"]) >= 10, "the well-behaved client was barely served"
    assert report["p99_s"] < P99_BOUND_S, f"rank p99 {report['p99_s']:.3f} s"
    assert report["max_s"] < MAX_BOUND_S, f"slowest rank {report['max_s']:.3f} s"


def _settled(daemon: Daemon, socks0: int, *, timeout_s: float = SLACK_S) -> int:
    """Wait until the daemon holds at most ``socks0`` sockets again; the count then."""
    return poll(lambda: daemon_sockets(daemon.proc.pid), lambda n: n <= socks0, timeout_s=timeout_s)


def _inq(sock: socket.socket) -> int:
    """Bytes waiting in the socket's receive queue (FIONREAD)."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


@contextlib.contextmanager
def _closing_all(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


# ------------------------------------------------------------------ oversized


def _over_limit_line() -> bytes:
    pad = b"x" * (MAX_LINE_BYTES - 30)
    line = b'{"id": 1, "op": "health", "pad": "' + pad + b'"}\n'
    assert MAX_LINE_BYTES < len(line) - 1 < MAX_LINE_BYTES + 16  # just over the limit
    return line


Outcome = tuple[int, list[dict[str, Any]], bool]


def _endless_line(path: Path, total: int) -> Outcome:
    """Send up to ``total`` bytes with no newline; (bytes sent, answers, closed)."""
    sock = connect(path)
    chunk = b"x" * (1 << 20)
    sent = 0
    try:
        while sent < total:
            sent += sock.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    except TimeoutError:
        return sent, [], False  # the daemon neither read nor closed
    finally:
        answers, closed = read_lines(sock, timeout_s=SLACK_S)
        sock.close()
    return sent, answers, closed


def _endless_into(path: Path, total: int, out: list[Outcome]) -> None:
    out.append(_endless_line(path, total))


def test_oversized_lines_are_refused_and_not_held(daemon: Daemon, long_run: bool) -> None:  # noqa: FBT001
    """
    A line just over max_line_bytes and endless lines (MBs, no newline) are answered
    line_too_long and closed; the daemon stops reading them at the limit, frees what it
    read, and keeps serving others.
    """
    rounds, endless, endless_bytes = (12, 16, 256 << 20) if long_run else (4, 16, 32 << 20)
    pid = daemon.proc.pid
    rss: list[int] = []
    with well_behaved(daemon.socket_path) as client:
        socks0 = daemon_sockets(pid)
        for _ in range(rounds):
            with _closing_all([connect(daemon.socket_path) for _ in range(32)]) as socks:
                for sock in socks:
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        sock.sendall(_over_limit_line())
                for sock in socks:
                    answers, closed = read_lines(sock, timeout_s=SLACK_S)
                    assert [("line_too_long", None)] == [
                        (a["error"]["code"], a["id"]) for a in answers]
                    assert closed
            results: list[Outcome] = []
            args = (daemon.socket_path, endless_bytes, results)
            threads = [threading.Thread(target=_endless_into, args=args) for _ in range(endless)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert endless == len(results)
            for sent, answers, closed in results:
                assert ["line_too_long"] == [a["error"]["code"] for a in answers]
                assert closed
                # the daemon stopped reading at the limit: the rest never left our socket
                assert sent < 8 * MAX_LINE_BYTES + (4 << 20)
            assert _settled(daemon, socks0) <= socks0
            rss.append(daemon_rss_kib(pid))
        report = client.finish()
    _assert_served(report)
    assert rss[-1] - rss[0] < FLAT_KIB, f"RSS by round (KiB): {rss}"


# ------------------------------------------------------------------ half-open


def _fill_until_stalled(socks: list[socket.socket]) -> None:
    """Send requests without reading until no more answers arrive: the buffers are full."""
    last = [-1] * len(socks)
    steady = 0
    while steady < 5:
        for sock in socks:
            sock.sendall(b'{"op": "health"}\n' * 50)
        time.sleep(0.02)
        queued = [_inq(sock) for sock in socks]
        steady = steady + 1 if queued == last else 0
        last = queued


def test_half_open_connections_are_closed(daemon: Daemon, long_run: bool) -> None:  # noqa: FBT001
    """
    Connections that send half a line and wait, and ones that filled their socket
    buffers with unread answers and went quiet, are closed by idle_timeout_s (plus
    write_timeout_s for an answer that cannot be written); others are served meanwhile.
    """
    pid = daemon.proc.pid
    n_half, n_full = (400, 60) if long_run else (100, 20)
    with well_behaved(daemon.socket_path) as client:
        socks0 = daemon_sockets(pid)
        half = [connect(daemon.socket_path) for _ in range(n_half)]
        full = [connect(daemon.socket_path) for _ in range(n_full)]
        with _closing_all(half + full):
            for sock in half:
                sock.sendall(b'{"id": 1, "op": "hea')
            _fill_until_stalled(full)
            assert daemon_sockets(pid) >= socks0 + len(full)  # they are there, and active
            started = time.monotonic()
            settled = _settled(daemon, socks0, timeout_s=IDLE_TIMEOUT_S + WRITE_TIMEOUT_S + SLACK_S)
            took = time.monotonic() - started
            assert settled <= socks0, f"still open after {took:.1f} s"
            for sock in half:
                answers, closed = read_lines(sock, timeout_s=SLACK_S)
                assert [("idle_timeout", None)] == [(a["error"]["code"], a["id"]) for a in answers]
                assert closed
            for sock in full:
                assert read_lines(sock, timeout_s=SLACK_S)[1]  # closed by the daemon
        report = client.finish()
    _assert_served(report)


#: An ingest whose one event is rejected: the answer (ok, with the rejection) is counted
#: in stats' events.rejected, which nothing else in this module makes.
_REJECTED_INGEST = b'{"op": "ingest", "events": [{"id": "x"}]}\n'


def _flood_unread(path: Path, until: float, out: list[str]) -> None:
    """Send requests and never read an answer; record how it ended."""
    sock = connect(path, timeout_s=until - time.monotonic())
    lines = _REJECTED_INGEST * 200
    try:
        while time.monotonic() < until:
            sock.sendall(lines)
        out.append("still open at the deadline")
    except (BrokenPipeError, ConnectionResetError):
        out.append("dropped")
    except TimeoutError:
        out.append("blocked until the deadline")
    finally:
        sock.close()


def test_clients_that_never_read_are_dropped_without_growing_memory(
    daemon: Daemon, long_run: bool  # noqa: FBT001
) -> None:
    """
    Clients that pipeline requests and never read the answers are no longer read (the
    daemon does not keep answering into its buffers) and are dropped after
    write_timeout_s; the daemon's memory stays flat and others are served.
    """
    pid = daemon.proc.pid
    flooders, rounds = (8, 6) if long_run else (4, 3)
    growth: list[int] = []
    handled: list[int] = []
    with well_behaved(daemon.socket_path) as client:
        for _ in range(rounds):
            rejected = stats(daemon.socket_path)["events"]["rejected"]
            before = peak = daemon_rss_kib(pid)
            until = time.monotonic() + WRITE_TIMEOUT_S + SLACK_S
            ends: list[str] = []
            threads = [
                threading.Thread(target=_flood_unread, args=(daemon.socket_path, until, ends))
                for _ in range(flooders)
            ]
            for thread in threads:
                thread.start()
            while any(t.is_alive() for t in threads):
                peak = max(peak, daemon_rss_kib(pid))
                time.sleep(0.05)
            assert ["dropped"] * flooders == ends
            handled.append(stats(daemon.socket_path)["events"]["rejected"] - rejected)
            growth.append(peak - before)
        report = client.finish()
    _assert_served(report)
    # What may be answered before the daemon stops reading a client: what its socket
    # buffer takes (a few hundred small answers), the transport's 64 KiB high-water mark
    # (some 500) and max_in_flight (64): about 900 a client here. Answering on until
    # write_timeout_s, as the daemon once did, made it 2,500 to 6,000 a client.
    assert max(handled) < 1500 * flooders, f"answers written to unread buffers by round: {handled}"
    # the first round also starts the worker threads that decode ingests
    assert max(growth[1:]) < FLAT_KIB, f"RSS peak growth by round (KiB): {growth}"


# ------------------------------------------------------------------------ slow


def _read_answers(sock: socket.socket, n: int, *, timeout_s: float) -> list[dict[str, Any]]:
    """The next ``n`` answer lines (fewer if the connection closes or the time runs out)."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while data.count(b"\n") < n and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 16)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def _dribble_until_closed(dribblers: list[socket.socket], *, timeout_s: float) -> list[float]:
    """
    Send each dribbler a byte every 200 ms until the daemon closes it (the send fails);
    the seconds each lasted (``inf`` for one still open after ``timeout_s``).
    """
    started = time.monotonic()
    lasted = [float("inf")] * len(dribblers)
    while time.monotonic() - started < timeout_s and float("inf") in lasted:
        for k, sock in enumerate(dribblers):
            if lasted[k] == float("inf"):
                try:
                    sock.sendall(b"x")
                except (BrokenPipeError, ConnectionResetError):
                    lasted[k] = time.monotonic() - started
        time.sleep(0.2)
    return lasted


def test_slow_clients_are_served_and_dribblers_closed(daemon: Daemon, long_run: bool) -> None:  # noqa: FBT001
    """
    Clients that send their requests a byte every 10 ms are answered, twice on one
    connection; dribblers that never finish a line (a byte every 200 ms) are closed
    with idle_timeout: bytes that never make a request do not keep a connection alive.
    """
    lines = [b'{"id":"s%d","op":"rank","user":"slow","candidates":["a","b"]}\n' % n
             for n in range(2)]  # fmt: skip
    n = 100 if long_run else 20
    with well_behaved(daemon.socket_path) as client:
        slow = [connect(daemon.socket_path) for _ in range(n)]
        dribblers = [connect(daemon.socket_path) for _ in range(n)]
        with _closing_all(slow + dribblers):
            for sock in dribblers:
                sock.sendall(b'{"op": "health", "pad": "')
            for k, byte in enumerate(b"".join(lines)):
                for sock in slow:
                    sock.sendall(bytes([byte]))
                if k % 20 == 0:
                    for sock in dribblers:
                        sock.sendall(b"x")
                time.sleep(0.01)
            for sock in slow:
                answers = _read_answers(sock, 2, timeout_s=SLACK_S)
                assert [("s0", True), ("s1", True)] == sorted((a["id"], a["ok"]) for a in answers)
            lasted = _dribble_until_closed(dribblers, timeout_s=IDLE_TIMEOUT_S + SLACK_S)
            assert max(lasted) < IDLE_TIMEOUT_S + SLACK_S, f"dribblers open for (s): {lasted}"
            for sock in dribblers:
                answers, closed = read_lines(sock, timeout_s=SLACK_S)
                assert ["idle_timeout"] == [a["error"]["code"] for a in answers]
                assert closed
        report = client.finish()
    _assert_served(report)


# --------------------------------------------------------- many connections


def _open_many(path: Path, n: int) -> tuple[list[socket.socket], int, list[str]]:
    """Open ``n`` connections and ask each for health: (sockets, answered ok, refusals)."""
    socks = [connect(path) for _ in range(n)]
    for sock in socks:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b'{"id": 1, "op": "health"}\n')
    ok, refusals = 0, []
    for sock in socks:
        (answer,) = _read_answers(sock, 1, timeout_s=SLACK_S)
        if answer["ok"]:
            ok += 1
            continue
        refusals.append(answer["error"]["code"])
        assert ([], True) == read_lines(sock, timeout_s=SLACK_S)  # nothing more, and closed
    return socks, ok, refusals


def test_thousands_of_connections(daemon: Daemon, long_run: bool) -> None:  # noqa: FBT001
    """
    2,000 connections at once against max_connections = 500: the excess is answered
    too_many_connections and closed, the connected client keeps being served, and when
    they close the daemon's descriptors and memory come back to where they were.
    """
    pid = daemon.proc.pid
    many = 2000
    assert nofile_limit(pid) >= MAX_CONNECTIONS + 100, "the daemon's RLIMIT_NOFILE is too low"
    rounds = 6 if long_run else 3
    rss: list[int] = []
    with well_behaved(daemon.socket_path) as client:
        socks0 = daemon_sockets(pid)
        for _ in range(rounds):
            present = stats(daemon.socket_path)["connections"] - 1  # less the stats connection
            assert _settled(daemon, socks0) <= socks0  # the stats connection is gone too
            socks, ok, refusals = _open_many(daemon.socket_path, many)
            with _closing_all(socks):
                assert MAX_CONNECTIONS - present == ok
                assert ["too_many_connections"] * (many - ok) == refusals
                assert daemon_sockets(pid) >= socks0 + ok
            assert _settled(daemon, socks0) <= socks0
            rss.append(daemon_rss_kib(pid))
        report = client.finish()
    _assert_served(report)
    assert rss[-1] - rss[0] < FLAT_KIB, f"RSS by round (KiB): {rss}"
    with Client(daemon.socket_path) as after:
        assert after.request("health")["ok"]


# ------------------------------------------------------------------ peer uid

_AS_UID = """\
import json, os, socket, sys, time
uid, n = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
for k in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(os.environ["SOCK"])
    event = {"id": f"peer-{uid}-{k}", "type": "click", "user": f"peer-{uid}", "item": "a",
             "ts": time.time()}
    try:
        s.sendall(json.dumps({"id": k, "op": "ingest", "events": [event]}).encode() + b"\\n")
    except OSError:
        pass
    f = s.makefile("rb")
    answer = json.loads(f.readline())
    try:
        then = f.read().decode() or "closed"
    except ConnectionResetError:
        then = "closed"
    except TimeoutError:
        then = "open"
    print(json.dumps({"answer": answer, "then": then}))
    s.close()
"""


def _as_uid(path: Path, uid: int, n: int) -> list[dict[str, Any]]:
    """Connect ``n`` times as ``uid`` (dropped to from root), each sending one ingest."""
    out = subprocess.run(
        [sys.executable, "-c", _AS_UID, str(uid), str(n)], env={"SOCK": str(path)},
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
    )  # fmt: skip
    assert 0 == out.returncode, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_peer_uid_not_allowed_is_refused_and_nothing_ingested(daemon: Daemon) -> None:
    """
    A peer running as nobody is answered forbidden and closed, and the events it sent
    are not in the log; a peer whose uid is in allowed_uids is served.
    """
    if os.getuid() != 0:
        pytest.fail("this test connects as other uids and must run as root (CI does)")
    n = 50
    with well_behaved(daemon.socket_path) as client:
        refused = _as_uid(daemon.socket_path, NOBODY, n)
        served = _as_uid(daemon.socket_path, ALLOWED_UID, 2)
        report = client.finish()
    _assert_served(report)
    assert [("forbidden", None, "closed")] * n == [
        (r["answer"]["error"]["code"], r["answer"]["id"], r["then"]) for r in refused]
    assert [(True, 1), (True, 1)] == [(r["answer"]["ok"], r["answer"]["accepted"]) for r in served]
    now = time.time()
    with Client(daemon.socket_path) as own:
        nobody = [{"id": f"peer-{NOBODY}-{k}", "type": "click", "user": "x", "item": "a",
                   "ts": now} for k in range(n)]  # fmt: skip
        again = [{"id": f"peer-{ALLOWED_UID}-{k}", "type": "click", "user": "x", "item": "a",
                  "ts": now} for k in range(2)]  # fmt: skip
        # an id already in the log would be a duplicate: none of nobody's is
        assert (n, 0) == _ack(own.request("ingest", events=nobody))
        assert (0, 2) == _ack(own.request("ingest", events=again))


def _ack(answer: dict[str, Any]) -> tuple[int, int]:
    return answer["accepted"], answer["duplicates"]
