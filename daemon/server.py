"""
The Unix-socket server: connections, limits, pipelining, peer credentials.

Each connection is an `asyncio.Protocol`: ``data_received`` splits lines and decodes
them at once. Rank requests that arrive in the same turn of the event loop, over all
connections, are answered together in the next turn by ``rank_now`` (one batch, no task
per request); everything else, and ranks that ``rank_now`` declines (a vector must be
encoded), runs as one task per request. Requests on a connection are therefore
answered as they complete (out of order; clients match on ``id``). Streams, a task per
request and a timer per line cost about a third of the daemon's time per request
before (measured with py-spy at 32 connections). Everything is bounded:

- a line longer than ``max_line_bytes`` is answered ``line_too_long`` and the
  connection closes (the stream cannot be resynchronised safely);
- at most ``max_in_flight`` unanswered requests per connection: beyond that the
  server stops reading the connection (and leaves read lines undecoded), so a
  pipelining client slows down instead of growing the daemon's memory;
- a client that does not read its answers is no longer read (its requests would only
  pile answers up in the daemon) and is dropped if the transport stays paused for
  ``write_timeout_s``; one with nothing in flight that completes no request for
  ``idle_timeout_s`` is told so and closed (a sweep checks every second or so): bytes
  that never make a line do not keep a connection alive;
- a connection being closed is aborted if its last answer cannot be written within
  ``write_timeout_s`` (a client that does not read would otherwise hold it forever);
- more than ``max_connections`` connections are refused, as are peers whose uid/gid
  (SO_PEERCRED) is not allowed.

A slow or hostile connection therefore holds at most its own buffers and tasks; the
other connections keep being served.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import structlog

from daemon.config import ServerSection
from daemon.protocol import (
    ProtocolError,
    Rank,
    Request,
    RequestDecoder,
    encode_error,
    encode_response,
)

__all__ = ["Handler", "RankNow", "Server", "bind_unix_socket"]

Handler = Callable[[Request], Awaitable[dict[str, Any]]]
#: Ranks a batch at once: a body or a `ProtocolError` per request, or None to decline
#: (the requests then go to the handler, one task each).
RankNow = Callable[[Sequence[Rank]], "list[dict[str, Any] | ProtocolError] | None"]
_CREDS: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SO_PEERGROUPS: Final = 59  # Linux's value, for Pythons whose socket module lacks the name
_MAX_GROUPS: Final = 1024
#: Connections the kernel holds before the loop accepts them (a burst of clients while
#: the loop is busy); one more gets EAGAIN from connect(), which asyncio clients mistake
#: for a connection in progress and then fail with EINVAL on their first recv.
LISTEN_BACKLOG: Final = 1024
_log = structlog.get_logger("daemon.server")


def bind_unix_socket(path: os.PathLike[str] | str, *, mode: int) -> socket.socket:
    """
    A listening Unix socket at ``path`` with permission bits ``mode``.

    A stale socket file (no one listening) is replaced; a live one is an error, so two
    daemons never share a socket.
    """
    path = Path(path)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: left by a daemon that died
        else:
            probe.close()
            msg = f"{path}: another process is listening on this socket"
            raise OSError(msg)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)  # no window in which the file has wider permissions
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    path.chmod(mode)
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)  # noqa: FBT003 - the socket API's own signature
    return sock


class _Connection(asyncio.Protocol):
    """One client: splits and decodes its lines, writes its answers, enforces its limits."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._config = server.config
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline
        self.in_flight = 0
        self.last_active = time.monotonic()
        self.closing = False
        self._reading_paused = False
        self._writing_paused = False
        self._processing = False
        self._write_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] - uvloop's is not a subclass
        refusal = self._server.refusal(transport.get_extra_info("socket"))
        if refusal is not None:
            self._server.refused += 1
            self.fail(refusal)
            return
        self._server.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - protocol API
        self.closing = True
        for timer in (self._write_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._buf.clear()
        self._server.closed(self)

    def pause_writing(self) -> None:
        """The client is not reading: read no more of it, and drop it unless it catches up."""
        loop = asyncio.get_running_loop()
        self._write_timer = loop.call_later(self._config.write_timeout_s, self._not_reading)
        self._writing_paused = True
        self._flow()

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._writing_paused = False
        self.process()

    def _not_reading(self) -> None:
        _log.warning("client_not_reading", timeout_s=self._config.write_timeout_s)
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    # ----------------------------------------------------------------- lines

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self._buf += data
        self.process()

    def process(self) -> None:
        """Decode the buffered lines, as far as the in-flight limit allows."""
        if self._processing:
            return  # re-entered from an answer written during the loop below
        self._processing = True
        try:
            self._process_lines()
        finally:
            self._processing = False
        self._flow()

    def _process_lines(self) -> None:
        buf, limit = self._buf, self._config.max_line_bytes
        while (self.in_flight < self._config.max_in_flight and not self.closing
               and not self._writing_paused):  # fmt: skip
            end = buf.find(b"\n", self._scanned)
            if end < 0:
                self._scanned = len(buf)
                if len(buf) > limit:
                    self._line_too_long()
                return
            if end > limit:
                self._line_too_long()
                return
            line = bytes(buf[:end])  # bytes: decoded requests keep views of it
            del buf[: end + 1]
            self._scanned = 0
            if line.strip():
                self.last_active = time.monotonic()
                self._server.dispatch(self, line)

    def _flow(self) -> None:
        if self.transport is None or self.closing:
            return
        full = self.in_flight >= self._config.max_in_flight or self._writing_paused
        if full and not self._reading_paused:
            self.transport.pause_reading()
            self._reading_paused = True
        elif not full and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    def _line_too_long(self) -> None:
        limit = self._config.max_line_bytes
        self.fail(ProtocolError("line_too_long", f"request: longer than {limit} bytes"))

    # ---------------------------------------------------------------- answers

    def answered(self, data: bytes) -> None:
        """Write one answer for a request of this connection, and take the next lines."""
        self.in_flight -= 1
        self._server.in_flight -= 1
        self.last_active = time.monotonic()
        if not self.closing and self.transport is not None:
            self.transport.write(data)
        if self._buf or self._reading_paused:
            self.process()

    def fail(self, error: ProtocolError) -> None:
        """Answer ``error`` and close once it is written, or abort if it cannot be."""
        self.closing = True
        self._buf.clear()  # nothing more is read: what is buffered is freed now
        if self.transport is not None:
            self.transport.write(encode_error(error))
            self.transport.close()  # waits until the answer is written...
            if self._close_timer is None:  # ...which a client that does not read prevents
                loop = asyncio.get_running_loop()
                timeout_s = self._config.write_timeout_s
                self._close_timer = loop.call_later(timeout_s, self._not_reading)


class Server:
    """
    Serve `daemon.protocol` requests on a listening socket.

    ``handler`` answers any request in a task; ``rank_now``, when given, answers the
    rank requests of one turn of the loop together, at once.
    """

    def __init__(
        self, handler: Handler, config: ServerSection, decoder: RequestDecoder,
        *, rank_now: RankNow | None = None,
    ) -> None:  # fmt: skip
        self._handler = handler
        self.config = config
        self._decoder = decoder
        self._rank_now = rank_now
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ranks: list[tuple[_Connection, Rank]] = []
        self._ranks_scheduled = False
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = False
        self.requests = 0
        self.refused = 0
        self.in_flight = 0  # requests read and not yet answered, over all connections

    @property
    def connections(self) -> int:
        """Open connections now."""
        return len(self._connections)

    async def start(self, sock: socket.socket) -> None:
        """Start accepting on ``sock`` (bound and listening)."""
        loop = asyncio.get_running_loop()
        # create_unix_server calls listen() again, with its own backlog (100 by default)
        self._server = await loop.create_unix_server(lambda: _Connection(self), sock=sock,
                                                     backlog=LISTEN_BACKLOG)  # fmt: skip
        self._sweeper = loop.create_task(self._sweep_idle(), name="daemon[server].idle")

    async def stop(self, *, graceful_timeout_s: float) -> None:
        """Stop accepting and reading; let in-flight requests finish (bounded); close all."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in self._connections:
            if conn.transport is not None and not conn.closing:
                conn.transport.pause_reading()
        deadline = time.monotonic() + graceful_timeout_s
        while self.in_flight > 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - a counter
            await asyncio.sleep(0.01)
        for conn in list(self._connections):
            conn.closing = True
            if conn.transport is not None:
                conn.transport.close()

    # ---------------------------------------------------------- connections

    def opened(self, conn: _Connection) -> None:
        """A connection was accepted."""
        self._connections.add(conn)

    def closed(self, conn: _Connection) -> None:
        """A connection is gone (its in-flight requests still answer into the void)."""
        self._connections.discard(conn)

    def refusal(self, sock: socket.socket | None) -> ProtocolError | None:
        """Why a new connection is refused, or None."""
        if self._stopping:
            return ProtocolError("shutting_down", "the daemon is stopping")
        if len(self._connections) >= self.config.max_connections:
            limit = self.config.max_connections
            return ProtocolError("too_many_connections", f"at most {limit} connections")
        if sock is not None and not self._peer_allowed(sock):
            return ProtocolError("forbidden", "this peer's uid/gid is not allowed")
        return None

    def _peer_allowed(self, sock: socket.socket) -> bool:
        """Root, our own uid, a listed uid, or a listed gid (primary or supplementary)."""
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
        except OSError:
            return False
        _pid, uid, gid = _CREDS.unpack(raw)
        cfg = self.config
        if uid in {0, os.getuid(), *cfg.allowed_uids} or gid in cfg.allowed_gids:
            return True
        return bool(cfg.allowed_gids) and not _peer_groups(sock).isdisjoint(cfg.allowed_gids)

    async def _sweep_idle(self) -> None:
        """Tell connections idle for idle_timeout_s (nothing in flight) so, and close them."""
        limit = self.config.idle_timeout_s
        error = ProtocolError("idle_timeout", f"no request for {limit:g} s")
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            for conn in list(self._connections):
                if not conn.closing and not conn.in_flight and now - conn.last_active > limit:
                    conn.fail(error)

    # -------------------------------------------------------------- requests

    def dispatch(self, conn: _Connection, line: bytes) -> None:
        """Decode one line and answer it: now, with this turn's ranks, or in a task."""
        conn.in_flight += 1
        self.in_flight += 1
        try:
            request = self._decoder.decode(line)
        except ProtocolError as error:
            conn.answered(encode_error(error))
            return
        self.requests += 1
        if self._rank_now is not None and isinstance(request, Rank):
            self._ranks.append((conn, request))
            if not self._ranks_scheduled:
                self._ranks_scheduled = True
                asyncio.get_running_loop().call_soon(self._run_ranks)
            return
        self._spawn(conn, request)

    def _spawn(self, conn: _Connection, request: Request) -> None:
        task = asyncio.get_running_loop().create_task(
            self._answer(conn, request), name="daemon[server].request"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _run_ranks(self) -> None:
        """The rank requests of the last turn of the loop, as one batch."""
        assert self._rank_now is not None
        self._ranks_scheduled = False
        batch, self._ranks = self._ranks, []
        try:
            outcomes = self._rank_now([request for _, request in batch])
        except Exception:  # noqa: BLE001 - a bug answers "internal"; the daemon lives on
            _log.exception("rank_batch_failed", size=len(batch))
            outcomes = [ProtocolError("internal", "the daemon failed; see its log")] * len(batch)
        if outcomes is None:  # declined: each goes its own way
            for conn, request in batch:
                self._spawn(conn, request)
            return
        for (conn, request), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, ProtocolError):
                conn.answered(encode_error(outcome.with_id(request.id)))
            else:
                conn.answered(encode_response(request.id, outcome))

    async def _answer(self, conn: _Connection, request: Request) -> None:
        try:
            data = encode_response(request.id, await self._handler(request))
        except ProtocolError as error:
            data = encode_error(error.with_id(request.id))
        except Exception:  # noqa: BLE001 - any bug answers "internal"; the daemon lives on
            _log.exception("request_failed")
            data = encode_error(
                ProtocolError("internal", "the daemon failed; see its log", request.id)
            )
        conn.answered(data)


def _peer_groups(sock: socket.socket) -> set[int]:
    """The peer's supplementary groups (SO_PEERGROUPS, Linux 4.13+); empty if unknown."""
    option = getattr(socket, "SO_PEERGROUPS", _SO_PEERGROUPS)
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, 4 * _MAX_GROUPS)
    except OSError:
        return set()
    return set(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
