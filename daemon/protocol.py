"""
The socket protocol: one JSON object per line each way (DESIGN.md, Socket API).

Pure: bytes in, typed requests or a `ProtocolError` out; responses to bytes. The
server (`daemon.server`) owns the I/O. Every request may carry an ``id`` (an integer
or a short string) that its response echoes; requests on one connection may be
answered out of order, so clients match on it.

Errors are ``{"id": …, "ok": false, "error": {"code": …, "message": …}}``. The codes
are stable (clients branch on them); the message names the field and the rule and
never repeats a value from the request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from daemon.candidates import CandidateError, Candidates
from eventstore.schema import JSON_TYPE_WORDS, split_validation_error

__all__ = [
    "ERROR_CODES",
    "EXPORT_MAX_LIMIT",
    "Export",
    "Forget",
    "Health",
    "Ingest",
    "ProtocolError",
    "Rank",
    "Request",
    "RequestDecoder",
    "Stats",
    "UserInfo",
    "encode_error",
    "encode_response",
]

#: Every error code a response can carry, with what it means.
ERROR_CODES: Final = {
    "bad_request": "the request is not valid JSON or breaks a rule; the message says which",
    "unknown_op": "op is not one of rank, explain, ingest, user, forget, health, stats, export",
    "line_too_long": "the line is longer than [server].max_line_bytes; the connection closes",
    "too_many_candidates": "more candidates than [server].max_candidates",
    "busy": "the event log's writer is behind; retry after retry_after_ms",
    "storage_unavailable": "the event log cannot be written (disk full, read-only or failing "
    "file system; the message says which); nothing was stored; retry after retry_after_ms",
    "not_found": "the user is unknown",
    "forbidden": "the peer's uid/gid is not allowed; the connection closes",
    "too_many_connections": "the daemon is at [server].max_connections; the connection closes",
    "idle_timeout": "no request for [server].idle_timeout_s; the connection closes",
    "shutting_down": "the daemon is stopping and takes no new work",
    "internal": "a bug or an unexpected failure; the daemon logged it",
}

RequestId = int | str | None
_ID_MAX_CHARS: Final = 128
#: Most items one ``export`` answer holds (its ``limit``).
EXPORT_MAX_LIMIT: Final = 100_000


class _Base(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="op"):
    id: RequestId = None


class _RankWire(_Base, tag="rank"):
    """``rank`` as it arrives: the candidates stay JSON bytes (see `daemon.candidates`)."""

    user: str
    candidates: msgspec.Raw
    k: int | None = None
    context: dict[str, str | int | float | bool | None] | None = None
    explain: bool = False


class _ExplainWire(_RankWire, tag="explain"):
    """``explain``: ``rank`` with an explanation entry per item."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Rank:
    """
    Order ``candidates`` (item ids) for ``user``; at most ``k`` come back (all by default).

    ``op`` is ``"explain"`` for the explain op, which is ``rank`` with an explanation
    entry per item (score parts, policies applied), as is ``explain=True``.
    ``candidates`` may be given as a list of strings (converted on construction).

    ``user`` is the id the user is stored under: the decoder maps the caller's id
    through the privacy plugins (``user_id``). ``given_user`` is the id as the caller
    sent it, kept only when it was mapped: the answer's impression record is an event
    like any other, made from it and mapped by the privacy plugins on its way to the log.
    """

    user: str
    candidates: Candidates
    id: RequestId = None
    k: int | None = None
    context: dict[str, str | int | float | bool | None] | None = None
    explain: bool = False
    op: str = "rank"
    given_user: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.candidates, Candidates):
            object.__setattr__(self, "candidates", Candidates.from_ids(self.candidates))

    @property
    def explained(self) -> bool:
        """Whether the answer carries an explanation per item."""
        return self.explain or self.op == "explain"


class Ingest(_Base, tag="ingest"):
    """Append ``events`` (a list of event objects, or one); answered once durable."""

    events: msgspec.Raw


class UserInfo(_Base, tag="user"):
    """The state kept about ``user`` (mapped as in `Rank`): item ids raw, the user id never."""

    user: str


class Forget(_Base, tag="forget"):
    """Erase ``user`` everywhere and keep a tombstone; ``user`` mapped as in `Rank`."""

    user: str


class Health(_Base, tag="health"):
    """Liveness and readiness."""


class Stats(_Base, tag="stats"):
    """Counters, queue depths, latencies."""


class Export(_Base, tag="export"):
    """
    Per-item aggregates: counts, popularity decayed to now, click-through rate.

    Items ``offset`` to ``offset + limit - 1`` in the state's row order, as the privacy
    plugins let them out (``noise``); item ids only, never a user id.
    """

    offset: int = 0
    limit: int = 1000


_WireRequest = _RankWire | _ExplainWire | Ingest | UserInfo | Forget | Health | Stats | Export
Request = Rank | Ingest | UserInfo | Forget | Health | Stats | Export
_OPS: Final = ("rank", "explain", "ingest", "user", "forget", "health", "stats", "export")


class ProtocolError(Exception):
    """A request that cannot be served: its stable ``code``, a message, the request id."""

    def __init__(
        self, code: str, message: str, request_id: RequestId = None,
        *, retry_after_ms: int | None = None,
    ) -> None:  # fmt: skip
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after_ms = retry_after_ms
        super().__init__(f"{code}: {message}")

    def with_id(self, request_id: RequestId) -> ProtocolError:
        """The same error for request ``request_id`` (unless it carries an id already)."""
        if self.request_id is not None:
            return self
        return ProtocolError(
            self.code, self.message, request_id, retry_after_ms=self.retry_after_ms
        )


class _IdOnly(msgspec.Struct):
    id: Any = None


_NAMED: Final = re.compile(r"`(?P<name>[^`]*)`")


class RequestDecoder:
    """
    Decode one request line and check the limits that are configuration.

    Args:
        max_candidates: most candidate ids in a ``rank``/``explain``.
        max_id_bytes: longest user id, item id or request id (bytes).
        user_id: maps the ``user`` of ``rank``, ``explain``, ``user`` and ``forget``
            to the id it is stored under (the privacy plugins' ``user_id``), after the
            raw id's limits are checked; None leaves ids as they are.
    """

    def __init__(self, *, max_candidates: int = 5000, max_id_bytes: int = 256,
                 user_id: Callable[[str], str] | None = None) -> None:  # fmt: skip
        self.max_candidates = max_candidates
        self.max_id_bytes = max_id_bytes
        self._user_id = user_id
        self._decoder = msgspec.json.Decoder(_WireRequest)
        self._id_decoder = msgspec.json.Decoder(_IdOnly)

    def decode(self, line: bytes) -> Request:
        """A typed request, or `ProtocolError` (with the request's id when it has one)."""
        try:
            request = self._decoder.decode(line)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as error:
            raise self._translate(error, line) from None
        self._check_limits(request)
        if isinstance(request, _RankWire):
            return self._rank(request)
        if self._user_id is not None and isinstance(request, UserInfo | Forget):
            return msgspec.structs.replace(request, user=self._user_id(request.user))
        return request

    def _request_id(self, line: bytes) -> RequestId:
        try:
            value = self._id_decoder.decode(line).id
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None
        if isinstance(value, bool) or not isinstance(value, int | str):
            return None
        return value if not isinstance(value, str) or len(value) <= _ID_MAX_CHARS else None

    def _translate(self, error: Exception, line: bytes) -> ProtocolError:
        request_id = self._request_id(line)
        if not isinstance(error, msgspec.ValidationError):
            return ProtocolError("bad_request", "json: malformed", request_id)
        what, path = split_validation_error(error)
        field = path.replace("[...]", "").lstrip(".").split("[", 1)[0] or "request"
        if field == "op":  # never echo the unknown op: it is client input
            return ProtocolError("unknown_op", f"op: expected one of {', '.join(_OPS)}", request_id)
        return ProtocolError("bad_request", _rule(what, field), request_id)

    def _check_limits(self, request: _WireRequest) -> None:
        rid = request.id
        if isinstance(rid, str) and len(rid) > _ID_MAX_CHARS:
            raise ProtocolError("bad_request", f"id: longer than {_ID_MAX_CHARS} characters")
        if isinstance(request, UserInfo | Forget):
            self._check_id(request.user, "user", rid)
        elif isinstance(request, Export):
            if request.offset < 0:
                raise ProtocolError("bad_request", "offset: must be at least 0", rid)
            if not 1 <= request.limit <= EXPORT_MAX_LIMIT:
                msg = f"limit: must be 1 to {EXPORT_MAX_LIMIT}"
                raise ProtocolError("bad_request", msg, rid)

    def _rank(self, wire: _RankWire) -> Rank:
        rid = wire.id
        self._check_id(wire.user, "user", rid)
        if wire.k is not None and wire.k < 1:
            raise ProtocolError("bad_request", "k: must be at least 1", rid)
        try:
            candidates = Candidates.parse(
                wire.candidates, max_count=self.max_candidates, max_id_bytes=self.max_id_bytes
            )
        except CandidateError as error:
            raise ProtocolError(error.code, str(error), rid) from None
        op = type(wire).__struct_config__.tag
        user, given = wire.user, None
        if self._user_id is not None:
            user, given = self._user_id(user), user
        return Rank(id=rid, user=user, candidates=candidates, k=wire.k, context=wire.context,
                    explain=wire.explain, op=op, given_user=given)  # fmt: skip

    def _check_id(self, value: str, field: str, rid: RequestId) -> None:
        if not value or len(value.encode()) > self.max_id_bytes:
            msg = f"{field}: must be 1 to {self.max_id_bytes} bytes"
            raise ProtocolError("bad_request", msg, rid)


def _rule(what: str, field: str) -> str:
    named = _NAMED.search(what)
    if what.startswith("Object missing required field"):
        return f"{named['name'] if named else field}: required"
    if what.startswith("Object contains unknown field"):
        return f"{named['name'][:64] if named else field}: unknown field"
    if field == "request" and "`object`" in what:
        return "request: expected a JSON object"
    if field == "events":
        return "events: expected an event object or a list of them"
    got = re.search(r"got `(\w+)`", what)
    if got and named:
        words = JSON_TYPE_WORDS
        want = " or ".join(words.get(t.strip(), t.strip()) for t in named["name"].split("|"))
        return f"{field}: expected {want}, got {words.get(got[1], got[1])}"
    return f"{field}: {what[:1].lower()}{what[1:]}"


_encoder: Final = msgspec.json.Encoder()


def encode_response(request_id: RequestId, body: Mapping[str, Any]) -> bytes:
    """``{"id": …, "ok": true, …body}`` as one line, newline included."""
    return _encoder.encode({"id": request_id, "ok": True, **body}) + b"\n"


def encode_error(error: ProtocolError) -> bytes:
    """The error response line for ``error``."""
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.retry_after_ms is not None:
        body["retry_after_ms"] = error.retry_after_ms
    return _encoder.encode({"id": error.request_id, "ok": False, "error": body}) + b"\n"
