"""
A TCP fault proxy on loopback, between a client (rerankd) and a server (a broker).

:class:`FaultProxy` listens on ``127.0.0.1:port`` and forwards every connection to its
upstream, byte for byte, in both directions. Its controls, callable from any thread,
inject the network faults the chaos tests need:

- :meth:`~FaultProxy.latency`: every chunk is held that long before it is passed on
  (each direction, so a round trip takes twice as long), in order, without limiting
  throughput (a chunk's delay runs while the next ones are read), as ``netem delay``.
- :meth:`~FaultProxy.drop`: every current connection is aborted with a TCP RST on
  both sides (``SO_LINGER`` 0, then close), as a middlebox or a rebooted peer does.
  Connections made afterwards work.
- :meth:`~FaultProxy.blackhole`: nothing is passed on, and nothing is closed. Data
  already read is held; the proxy stops reading, so the kernel's buffers and then the
  sender's TCP window fill, as behind a firewall that silently drops packets (TCP's
  retransmissions deliver them later). New connections are accepted but not
  connected upstream until the hole closes. Bytes are never lost or reordered, only
  late: what a real partition does to a TCP stream.
- :meth:`~FaultProxy.heal`: no latency, no black hole.

The proxy runs an asyncio loop on a daemon thread of its own, so a test's own loop
(or its blocking calls) never slows it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Self, TypeVar

__all__ = ["FaultProxy"]

_T = TypeVar("_T")
_CHUNK = 65536
#: SO_LINGER on, 0 s: close() sends RST and discards unsent data.
_LINGER_RST = struct.pack("ii", 1, 0)


class _Pipe:
    """One proxied connection: the client's side and, once connected, the upstream's."""

    def __init__(self, client: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.client = client
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.task = asyncio.current_task()  # the one that forwards (both directions)
        self.dropped = False  # reset() cancelled it: the end it was meant to have

    def writers(self) -> list[asyncio.StreamWriter]:
        return [self.client[1]] + ([self.upstream[1]] if self.upstream else [])

    def reset(self) -> None:
        """Abort both sides with RST (SO_LINGER 0), and stop forwarding."""
        self.dropped = True
        for writer in self.writers():
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            writer.transport.abort()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    def close(self) -> None:
        """Close both sides in order (FIN): what the proxy does when one side ended."""
        for writer in self.writers():
            writer.close()


class FaultProxy:
    """
    Forward ``127.0.0.1:port`` to ``upstream``, with faults switched on and off at will.

    Args:
        upstream: ``(host, port)`` of the server.
        port: the port to listen on (0: any free one; :attr:`port` tells which).

    Use as a context manager, or :meth:`start` and :meth:`close`.
    """

    def __init__(self, upstream: tuple[str, int], *, port: int = 0) -> None:
        self.upstream = upstream
        self.host = "127.0.0.1"
        self.port = port
        self.accepted = 0  # connections accepted since the start
        self.bytes_forwarded = 0  # handed on to the other side, both directions
        self._latency_s = 0.0
        self._flowing: asyncio.Event | None = None  # set: not black-holed
        self._pipes: set[_Pipe] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Listen, on a thread of its own; returns once the port accepts connections."""
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as e:  # noqa: BLE001 - handed to start()'s caller
                failure.append(e)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=main, name=f"fault-proxy:{self.port}", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        return self

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  reuse_address=True)  # fmt: skip
        self.port = int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop listening and reset every connection; idempotent."""
        if self._loop is None or self._thread is None or not self._loop.is_running():
            return

        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            pipes = list(self._pipes)
            for pipe in pipes:
                pipe.reset()
            tasks = [pipe.task for pipe in pipes if pipe.task is not None]
            if tasks:  # let them end before the loop stops
                await asyncio.wait(tasks, timeout=5)

        self._call(stop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        """``host:port`` of the listening side, as clients take it."""
        return f"{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections open through the proxy now."""
        return len(self._pipes)

    # ------------------------------------------------------------------- controls

    def latency(self, seconds: float) -> None:
        """Hold each chunk ``seconds`` before passing it on (each direction)."""
        self._latency_s = max(0.0, seconds)

    def drop(self) -> int:
        """Abort every current connection with RST on both sides; how many there were."""

        async def reset_all() -> int:
            pipes = list(self._pipes)
            for pipe in pipes:
                pipe.reset()
                self._pipes.discard(pipe)
            return len(pipes)

        return self._call(reset_all)

    def blackhole(self, on: bool) -> None:  # noqa: FBT001 - the switch is the argument
        """Forward nothing (and close nothing) while ``on``; resume when off."""

        async def switch() -> None:
            assert self._flowing is not None
            if on:
                self._flowing.clear()
            else:
                self._flowing.set()

        self._call(switch)

    def heal(self) -> None:
        """No latency, no black hole."""
        self.latency(0.0)
        self.blackhole(False)  # noqa: FBT003

    def _call(self, make: Callable[[], Awaitable[_T]]) -> _T:
        assert self._loop is not None

        async def run() -> _T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    # ----------------------------------------------------------------- forwarding

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.accepted += 1
        pipe = _Pipe((reader, writer))
        self._pipes.add(pipe)
        try:
            await self._flowing.wait()  # a black hole: the SYN never reaches the server
            try:
                pipe.upstream = await asyncio.open_connection(*self.upstream)
            except OSError:
                pipe.reset()  # the server refused: so does the proxy (RST)
                return
            up_reader, up_writer = pipe.upstream
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._forward(reader, up_writer))
                tg.create_task(self._forward(up_reader, writer))
        except* OSError:
            pipe.reset()  # a side was reset (or failed): pass the RST on to the other
        except* asyncio.CancelledError:
            task = asyncio.current_task()
            if not pipe.dropped or task is None or task.uncancel() > 0:
                raise
            # cancelled by reset() (drop, close): the end it was meant to have. Python
            # 3.11's start_server callback would call exception() on a cancelled task.
        finally:
            if pipe in self._pipes:
                self._pipes.discard(pipe)
                pipe.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """
        Copy ``reader`` to ``writer`` until EOF, each chunk delayed by the latency.

        A reading task stamps each chunk with its due time and queues it; this task
        writes them in order once due (so delays overlap, as on a long link). Both
        wait while the proxy is black-holed. EOF is passed on as EOF (a half-close),
        and a read error (a reset) in its turn, raised here: the connection then ends
        with RST on the other side too (see ``_serve``).
        """
        assert self._flowing is not None
        queue: asyncio.Queue[tuple[float, bytes | OSError]] = asyncio.Queue(maxsize=64)
        flowing = self._flowing

        async def read() -> None:
            data: bytes | OSError = b"-"
            while data:
                await flowing.wait()
                try:
                    data = await reader.read(_CHUNK)
                except OSError as e:
                    data = e
                await queue.put((time.monotonic() + self._latency_s, data))
                if isinstance(data, OSError):
                    return

        reading = asyncio.create_task(read())
        try:
            while True:
                due, data = await queue.get()
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await flowing.wait()
                if isinstance(data, OSError):
                    raise data
                if not data:
                    break
                # counted as it is handed on: a peer that has every byte then sees the full
                # count (counted after the drain, the last chunk could still be missing)
                self.bytes_forwarded += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        if writer.can_write_eof():
            writer.write_eof()
        else:
            writer.close()
