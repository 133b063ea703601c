"""
The Unix-socket server: connections, limits, pipelining, peer credentials.

One task per connection reads request lines and starts one task per request, so
requests on a connection are answered as they complete (out of order; clients match
on ``id``). Everything is bounded:

- a line longer than ``max_line_bytes`` is answered ``line_too_long`` and the
  connection closes (the stream cannot be resynchronised safely);
- at most ``max_in_flight`` unanswered requests per connection: beyond that the
  server stops reading the connection, so a pipelining client slows down instead of
  growing the daemon's memory;
- a client that does not read its answers for ``write_timeout_s`` is dropped, one
  that sends nothing for ``idle_timeout_s`` is told so and closed;
- more than ``max_connections`` connections are refused, as are peers whose uid/gid
  (SO_PEERCRED) is not allowed.

A slow or hostile connection therefore holds at most its own buffers and tasks; the
other connections keep being served.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import structlog

from daemon.config import ServerSection
from daemon.protocol import (
    ProtocolError,
    Request,
    RequestDecoder,
    encode_error,
    encode_response,
)

__all__ = ["Handler", "Server", "bind_unix_socket"]

Handler = Callable[[Request], Awaitable[dict[str, Any]]]
_CREDS: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SO_PEERGROUPS: Final = 59  # Linux's value, for Pythons whose socket module lacks the name
_MAX_GROUPS: Final = 1024
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
    sock.listen(1024)
    sock.setblocking(False)  # noqa: FBT003 - the socket API's own signature
    return sock


class _Connection:
    """
    The write side of one connection: whole-line, time-limited writes.

    Each answer is written whole, so lines never interleave; an answer that does not
    fit in the socket buffer waits for the client to read (bounded by the write
    timeout). The buffered answers of a connection are bounded by its in-flight limit.
    """

    def __init__(self, writer: asyncio.StreamWriter, write_timeout_s: float) -> None:
        self.writer = writer
        self._timeout = write_timeout_s

    async def send(self, data: bytes) -> None:
        writer = self.writer
        if writer.is_closing():
            return
        writer.write(data)
        if not writer.transport.get_write_buffer_size():
            return  # all of it went to the socket: nothing to wait for (the common case)
        try:
            async with asyncio.timeout(self._timeout):
                await writer.drain()
        except TimeoutError:
            _log.warning("client_not_reading", timeout_s=self._timeout)
            writer.transport.abort()
        except ConnectionError:
            writer.transport.abort()


class Server:
    """Serve `daemon.protocol` requests on a listening socket with ``handler``."""

    def __init__(self, handler: Handler, config: ServerSection, decoder: RequestDecoder) -> None:
        self._handler = handler
        self._config = config
        self._decoder = decoder
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
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
        self._server = await asyncio.start_unix_server(
            self._connection, sock=sock, limit=self._config.max_line_bytes
        )

    async def stop(self, *, graceful_timeout_s: float) -> None:
        """Stop accepting; let in-flight requests finish (bounded), then close every connection."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()  # each connection drains its in-flight requests, then closes
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=graceful_timeout_s + 1)

    # ------------------------------------------------------------- connection

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(writer, self._config.write_timeout_s)
        refusal = self._refusal(writer)
        if refusal is not None:
            self.refused += 1
            await conn.send(encode_error(refusal))
            await _close(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        in_flight: set[asyncio.Task[None]] = set()
        try:
            await self._read_loop(reader, conn, in_flight)
        except asyncio.CancelledError:
            await self._drain(in_flight)
            await _close(writer)
            raise
        finally:
            self._connections.discard(task)
        await self._drain(in_flight)
        await _close(writer)

    def _refusal(self, writer: asyncio.StreamWriter) -> ProtocolError | None:
        if self._stopping:
            return ProtocolError("shutting_down", "the daemon is stopping")
        if len(self._connections) >= self._config.max_connections:
            limit = self._config.max_connections
            return ProtocolError("too_many_connections", f"at most {limit} connections")
        sock = writer.get_extra_info("socket")
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
        cfg = self._config
        if uid in {0, os.getuid(), *cfg.allowed_uids} or gid in cfg.allowed_gids:
            return True
        return bool(cfg.allowed_gids) and not _peer_groups(sock).isdisjoint(cfg.allowed_gids)

    async def _read_loop(
        self, reader: asyncio.StreamReader, conn: _Connection, in_flight: set[asyncio.Task[None]]
    ) -> None:
        slots = asyncio.Semaphore(self._config.max_in_flight)
        while True:
            await slots.acquire()
            line = await self._read_line(reader, conn)
            if line is None:
                return
            if not line.strip():
                slots.release()
                continue
            self.in_flight += 1
            task = asyncio.create_task(
                self._answer(line, conn, slots), name="daemon[server].request"
            )
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

    async def _read_line(self, reader: asyncio.StreamReader, conn: _Connection) -> bytes | None:
        """The next line; None at end of input or after answering a limit breach."""
        try:
            async with asyncio.timeout(self._config.idle_timeout_s):
                line = await reader.readline()
        except TimeoutError:
            limit = self._config.idle_timeout_s
            await conn.send(
                encode_error(ProtocolError("idle_timeout", f"no request for {limit:g} s"))
            )
            return None
        except ValueError:  # the line is longer than the stream's limit
            limit = self._config.max_line_bytes
            error = ProtocolError("line_too_long", f"request: longer than {limit} bytes")
            await conn.send(encode_error(error))
            return None
        except ConnectionError:
            return None
        return line or None

    async def _answer(self, line: bytes, conn: _Connection, slots: asyncio.Semaphore) -> None:
        """Decode, handle, answer; the slot is held until the answer is written."""
        try:
            await conn.send(await self._response(line))
        finally:
            self.in_flight -= 1
            slots.release()

    async def _response(self, line: bytes) -> bytes:
        request_id = None
        try:
            request = self._decoder.decode(line)
            request_id = request.id
            self.requests += 1
            return encode_response(request_id, await self._handler(request))
        except ProtocolError as error:
            return encode_error(error.with_id(request_id))
        except Exception:  # noqa: BLE001 - any bug answers "internal"; the daemon lives on
            _log.exception("request_failed")
            return encode_error(
                ProtocolError("internal", "the daemon failed; see its log", request_id)
            )

    async def _drain(self, in_flight: set[asyncio.Task[None]]) -> None:
        if in_flight:
            await asyncio.wait(list(in_flight), timeout=self._config.graceful_timeout_s)


def _peer_groups(sock: socket.socket) -> set[int]:
    """The peer's supplementary groups (SO_PEERGROUPS, Linux 4.13+); empty if unknown."""
    option = getattr(socket, "SO_PEERGROUPS", _SO_PEERGROUPS)
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, 4 * _MAX_GROUPS)
    except OSError:
        return set()
    return set(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
