"""
A small synchronous client for the socket API, for scripts, tests and the CLI.

    with Client("var/rerankd.sock") as client:
        client.request("ingest", events=[{...}])
        ranked = client.request("rank", user="u-42", candidates=["a", "b", "c"])

`request` sends one request and waits for its answer; `send` and `receive` let a
caller pipeline several requests and match the answers by ``id``.
"""

from __future__ import annotations

import itertools
import socket
from pathlib import Path
from typing import Any, Self

import msgspec

__all__ = ["Client", "RequestFailedError"]


class RequestFailedError(Exception):
    """The daemon answered ``ok: false``; ``code`` is the stable error code."""

    def __init__(self, code: str, message: str, response: dict[str, Any]) -> None:
        self.code = code
        self.message = message
        self.response = response
        super().__init__(f"{code}: {message}")


class Client:
    """One connection to the daemon's Unix socket."""

    def __init__(self, path: str | Path, *, timeout_s: float | None = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(str(path))
        except OSError:
            self._sock.close()
            raise
        self._file = self._sock.makefile("rb")
        self._ids = itertools.count(1)

    def send(self, op: str, **fields: Any) -> int:
        """Send one request without waiting; returns its id."""
        request_id = next(self._ids)
        self.send_raw(msgspec.json.encode({"id": request_id, "op": op, **fields}) + b"\n")
        return request_id

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (tests of malformed input use this)."""
        self._sock.sendall(data)

    def receive(self) -> dict[str, Any]:
        """The next answer line, decoded; ConnectionError if the daemon closed the connection."""
        line = self._file.readline()
        if not line:
            msg = "the daemon closed the connection"
            raise ConnectionError(msg)
        return msgspec.json.decode(line)  # type: ignore[no-any-return]

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its answer; RequestFailedError if it failed."""
        request_id = self.send(op, **fields)
        response = self.receive()
        if response.get("id") != request_id:
            msg = f"answer for request {response.get('id')!r}, expected {request_id}"
            raise ConnectionError(msg)
        if not response.get("ok"):
            error = response.get("error", {})
            raise RequestFailedError(error.get("code", "?"), error.get("message", ""), response)
        return response

    def close(self) -> None:
        """Close the connection."""
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
