"""
The fault proxy of the chaos tests (``proxy.FaultProxy``) against a real echo server
on loopback: it forwards faithfully, and each fault does what it says.
"""

from __future__ import annotations

import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from proxy import FaultProxy

pytestmark = pytest.mark.chaos


class Echo(socketserver.ThreadingTCPServer):
    """Echoes every byte back; records what each connection received and how it ended."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.received: list[bytearray] = []
        self.endings: list[str] = []
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class EchoHandler(socketserver.BaseRequestHandler):
    """Echo; on a chunk that ends with b"RST", reset the connection instead (SO_LINGER 0)."""

    def handle(self) -> None:
        server = self.server
        assert isinstance(server, Echo)
        got = bytearray()
        with server.lock:
            server.received.append(got)
        ending = "eof"
        try:
            while data := self.request.recv(65536):
                got += data
                if data.endswith(b"RST"):
                    self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                            struct.pack("ii", 1, 0))  # fmt: skip
                    self.request.close()  # now: socketserver would shut down (FIN) first
                    ending = "sent reset"
                    break
                self.request.sendall(data)
        except ConnectionResetError:
            ending = "reset"
        with server.lock:
            server.endings.append(ending)


@pytest.fixture(name="echo")
def fixture_echo() -> Iterator[Echo]:
    server = Echo()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(name="proxy")
def fixture_proxy(echo: Echo) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", echo.port)) as proxy:
        yield proxy


def connect(proxy: FaultProxy, timeout_s: float = 10.0) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=timeout_s)


def receive(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def drain(sock: socket.socket) -> None:
    """Read until EOF (a reset raises ConnectionResetError)."""
    while sock.recv(65536):
        pass


def round_trip_s(sock: socket.socket) -> float:
    t0 = time.monotonic()
    sock.sendall(b"x")
    assert b"x" == receive(sock, 1)
    return time.monotonic() - t0


def test_forwards_every_byte_both_ways(proxy: FaultProxy, echo: Echo) -> None:
    """2 MiB of random bytes through the proxy come back unchanged; the server saw them."""
    payload = os.urandom(2 * 1024 * 1024)
    with connect(proxy) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        echoed = receive(sock, len(payload))
        sender.join()
    assert payload == echoed
    assert [payload] == [bytes(b) for b in echo.received]
    assert 1 == proxy.accepted
    assert proxy.bytes_forwarded >= 2 * len(payload)


def test_latency_delays_each_direction_until_healed(proxy: FaultProxy) -> None:
    """With 0.2 s of latency a round trip takes at least 0.4 s; after heal() it is quick."""
    with connect(proxy) as sock:
        before = round_trip_s(sock)
        proxy.latency(0.2)
        slow = [round_trip_s(sock) for _ in range(3)]
        proxy.heal()
        after = round_trip_s(sock)
    assert before < 0.3
    assert min(slow) >= 0.4
    assert after < 0.3


def test_latency_does_not_serialize_chunks(proxy: FaultProxy) -> None:
    """Ten messages sent at once under 0.3 s of latency all return within one round trip or so."""
    proxy.latency(0.3)
    with connect(proxy) as sock:
        t0 = time.monotonic()
        for k in range(10):
            sock.sendall(bytes([k]))
            time.sleep(0.01)  # separate chunks
        echoed = receive(sock, 10)
        elapsed = time.monotonic() - t0
    assert bytes(range(10)) == echoed
    assert 0.6 <= elapsed < 2.5  # 10 serialized round trips would take 6 s


def test_drop_resets_both_sides_and_later_connections_work(proxy: FaultProxy,
                                                           echo: Echo) -> None:  # fmt: skip
    """drop() aborts the connection with RST on the client and on the server; a new one works."""
    with connect(proxy) as sock:
        assert 0.0 < round_trip_s(sock)
        assert 1 == proxy.drop()
        with pytest.raises(ConnectionResetError):
            drain(sock)
    with connect(proxy) as again:
        assert 0.0 < round_trip_s(again)
    # each connection's handler thread records its ending when it sees it: the dropped
    # one's may come after the second's clean close on a busy machine (CI saw that)
    deadline = time.monotonic() + 10
    while len(echo.endings) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ["eof", "reset"] == sorted(echo.endings)
    assert 2 == proxy.accepted


def test_a_reset_by_the_server_reaches_the_client_as_a_reset(proxy: FaultProxy) -> None:
    """The server's RST is passed on: the client's read fails, it does not see a clean EOF."""
    with connect(proxy) as sock:
        sock.sendall(b"RST")
        with pytest.raises(ConnectionResetError):
            drain(sock)


def test_eof_is_passed_on_as_eof(proxy: FaultProxy, echo: Echo) -> None:
    """A client's half-close reaches the server as EOF; its answer still comes back, then EOF."""
    with connect(proxy) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert b"last words" == receive(sock, 100)
        assert b"" == sock.recv(1)
    assert ["eof"] == echo.endings


def test_blackhole_forwards_nothing_closes_nothing_then_delivers(proxy: FaultProxy,
                                                                 echo: Echo) -> None:  # fmt: skip
    """
    While black-holed, data sent on an open connection or on a new one reaches nobody,
    and neither connection is closed; after heal() both deliver what was held.
    """
    with connect(proxy, timeout_s=1.0) as old:
        assert 0.0 < round_trip_s(old)
        proxy.blackhole(True)  # noqa: FBT003
        old.sendall(b"held")
        with pytest.raises(TimeoutError):  # no answer, and no EOF or RST either
            old.recv(1)
        new = connect(proxy, timeout_s=1.0)  # the kernel accepts; nothing goes upstream
        new.sendall(b"new")
        with pytest.raises(TimeoutError):
            new.recv(1)
        upstream_connections = len(echo.received)
        received_meanwhile = [bytes(b) for b in echo.received]
        assert 2 == proxy.connections
        proxy.heal()
        old.settimeout(10)
        new.settimeout(10)
        assert (b"held", b"new") == (receive(old, 4), receive(new, 3))
        new.close()
    assert (1, [b"x"]) == (upstream_connections, received_meanwhile)


def test_close_resets_open_connections(echo: Echo) -> None:
    """Closing the proxy resets its connections and stops listening."""
    proxy = FaultProxy(("127.0.0.1", echo.port)).start()
    sock = connect(proxy)
    assert 0.0 < round_trip_s(sock)
    proxy.close()
    with pytest.raises(ConnectionResetError):
        drain(sock)
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        connect(proxy).close()
