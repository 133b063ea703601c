"""
The command line's socket side: connect to the running daemon, ask it, render answers.

Every failure to reach or use the daemon becomes a :class:`CliError`, shown as one
line ``rerankd: <message>`` on stderr with exit status 1, never a traceback.

``ingest`` streams events to the daemon in batches, several requests in flight on one
connection (`DESIGN.md`, Socket API). A batch answered ``busy`` is sent again after
``retry_after_ms``: the daemon appended nothing of it, so nothing is counted twice.
"""

from __future__ import annotations

import bisect
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, Protocol

import click
import msgspec

from daemon.client import Client, RequestFailedError

__all__ = [
    "Batch",
    "CliError",
    "IngestReport",
    "ask",
    "connect",
    "count_lines",
    "ingest",
    "read_batches",
    "render_export",
    "render_ingest",
    "render_ranking",
    "render_stats",
    "render_user",
]

#: Rejection reasons an ingest summary lists (the rest are counted).
MAX_REASONS: Final = 10
#: Room for ``{"id":…,"op":"ingest","events":`` around a batch on the request line.
_ENVELOPE_BYTES: Final = 64
_INDEX_PREFIX: Final = re.compile(r"^\[\d+\] ")


class CliError(click.ClickException):
    """A failure shown as one line, ``rerankd: <message>``, with exit status 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"rerankd: {self.format_message()}", file=file, err=file is None)


# ----------------------------------------------------------------- requests


@contextmanager
def connect(path: Path, *, offline_hint: bool = False, timeout_s: float = 30.0) -> Iterator[Client]:
    """
    A connection to the daemon at ``path``; connection failures become `CliError`.

    Args:
        path: the daemon's Unix socket.
        offline_hint: the command has ``--offline``; say so when no daemon runs.
        timeout_s: how long to wait for any one answer.
    """
    client = _open(path, offline_hint=offline_hint, timeout_s=timeout_s)
    with client:
        try:
            yield client
        except RequestFailedError as e:
            raise CliError(f"{e.code}: {e.message}") from e
        except TimeoutError as e:
            msg = f"the daemon at {path} did not answer within {timeout_s:g} s"
            raise CliError(msg) from e
        except ConnectionError as e:
            raise CliError(f"the daemon at {path} closed the connection ({e})") from e


def _open(path: Path, *, offline_hint: bool, timeout_s: float) -> Client:
    try:
        return Client(path, timeout_s=timeout_s)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        hint = ", or pass --offline" if offline_hint else ""
        msg = f"no daemon at {path} (start it with `rerankd run`{hint})"
        raise CliError(msg) from e
    except PermissionError as e:
        msg = f"{path}: permission denied (ask for the daemon's group, or use its user)"
        raise CliError(msg) from e
    except OSError as e:
        raise CliError(f"{path}: cannot connect ({e.strerror or e})") from e


def ask(client: Client, op: str, *, busy_wait_s: float = 30.0, **fields: Any) -> dict[str, Any]:
    """
    Send one request and return its answer, sending it again while the daemon is busy.

    Raises:
        RequestFailedError: the daemon answered ``ok: false`` (also for an answer
            without the request's id, such as ``forbidden``).
        ConnectionError: the daemon closed the connection or answered another request.
    """
    deadline = time.monotonic() + busy_wait_s
    while True:
        request_id = client.send(op, **fields)
        answer = client.receive()
        error = answer.get("error") or {}
        if error.get("code") == "busy" and time.monotonic() < deadline:
            time.sleep(error.get("retry_after_ms", 100) / 1000)
            continue
        _check(answer, request_id)
        return answer


def _check(answer: dict[str, Any], request_id: int) -> None:
    if not answer.get("ok"):
        error = answer.get("error") or {}
        raise RequestFailedError(error.get("code", "?"), error.get("message", ""), answer)
    if answer.get("id") != request_id:
        msg = f"answer for request {answer.get('id')!r}, expected {request_id}"
        raise ConnectionError(msg)


# ------------------------------------------------------------------- ingest


@dataclass(frozen=True, slots=True)
class Batch:
    """Events for one ``ingest`` request: their input positions, JSON bytes, lines read."""

    positions: list[int]
    events: list[bytes]
    span: int


@dataclass(slots=True)
class IngestReport:
    """What came of an ingest: counts, the first rejection reasons, any failure."""

    unit: str = "line"
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    reasons: list[tuple[int, str]] = field(default_factory=list)
    dropped: int = 0
    busy: int = 0
    failed: int = 0
    failure: str | None = None

    def reject(self, position: int, reason: str) -> None:
        """Count a rejection; keep the reasons of the earliest positions."""
        self.rejected += 1
        bisect.insort(self.reasons, (position, reason))
        del self.reasons[MAX_REASONS:]

    @property
    def ok(self) -> bool:
        """Everything read was accepted or already in the log."""
        return not (self.rejected or self.failed or self.failure)


class Progress(Protocol):
    """What ingest needs of a progress bar (tqdm's interface)."""

    total: float | None

    def update(self, n: float = 1) -> bool | None: ...

    def refresh(self) -> None: ...


def count_lines(path: Path) -> int:
    """Lines in the file at ``path`` (a last line without a newline counts)."""
    lines, last = 0, b"\n"
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def read_batches(
    stream: IO[bytes], report: IngestReport, progress: Progress, *, size: int,
    max_line_bytes: int,
) -> Iterator[Batch]:  # fmt: skip
    """
    Batches of at most ``size`` events from ``stream``: JSON lines, or one JSON array.

    A batch also fits one request line of ``max_line_bytes`` ([server].max_line_bytes).
    A line that is not JSON, or too long for a request line, is rejected here with
    its line number; the daemon judges the rest.
    """
    max_bytes = max_line_bytes - _ENVELOPE_BYTES
    head = stream.peek(4096) if hasattr(stream, "peek") else b""
    records: Iterator[tuple[int, bytes | None]]
    if head.lstrip().startswith(b"["):
        report.unit = "element"
        records = _array_records(stream, progress)
    else:
        records = _line_records(stream, report, max_bytes)
    return _batches(records, size=size, max_bytes=max_bytes)


def _line_records(
    stream: IO[bytes], report: IngestReport, max_bytes: int
) -> Iterator[tuple[int, bytes | None]]:
    for number, line in enumerate(stream, 1):
        text = line.strip()
        if not text:
            yield number, None
            continue
        try:
            msgspec.json.decode(text, type=msgspec.Raw)
        except msgspec.DecodeError:
            report.reject(number, "json: malformed")
            text = b""
        if len(text) > max_bytes:
            report.reject(number, f"event: longer than a request line ({max_bytes} bytes)")
            text = b""
        yield number, text or None


def _array_records(stream: IO[bytes], progress: Progress) -> Iterator[tuple[int, bytes | None]]:
    try:
        elements = msgspec.json.decode(stream.read(), type=list[msgspec.Raw])
    except msgspec.DecodeError as e:
        msg = f"input: neither JSON lines nor a JSON array of events ({e})"
        raise CliError(msg) from e
    progress.total = len(elements)
    progress.refresh()
    for number, raw in enumerate(elements, 1):
        yield number, bytes(raw)


def _batches(
    records: Iterable[tuple[int, bytes | None]], *, size: int, max_bytes: int
) -> Iterator[Batch]:
    positions: list[int] = []
    events: list[bytes] = []
    nbytes = span = 0
    for position, raw in records:
        if raw is not None and events and (len(events) == size or nbytes + len(raw) > max_bytes):
            yield Batch(positions, events, span)
            positions, events, nbytes, span = [], [], 0, 0
        span += 1
        if raw is not None:
            positions.append(position)
            events.append(raw)
            nbytes += len(raw) + 1
    if span:
        yield Batch(positions, events, span)


def ingest(
    client: Client, batches: Iterable[Batch], report: IngestReport, progress: Progress, *,
    window: int = 4, busy_limit_s: float = 120.0,
    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
) -> IngestReport:  # fmt: skip
    """
    Send ``batches``, up to ``window`` requests in flight, and fill ``report``.

    A lost connection or an error that ends the connection stops the ingest: it is
    recorded in ``report.failure`` with what was left unacknowledged, not raised.
    """
    pipeline = _Pipeline(client, report, progress, window=window, busy_limit_s=busy_limit_s,
                         clock=clock, sleep=sleep)  # fmt: skip
    try:
        pipeline.run(batches)
    except (RequestFailedError, ConnectionError, TimeoutError) as e:
        unacked = pipeline.unacknowledged()
        what = f"{e.code}: {e.message}" if isinstance(e, RequestFailedError) else str(e)
        what = what or type(e).__name__
        report.failed += unacked
        report.failure = f"stopped: {what} ({unacked} events sent but not acknowledged)"
    return report


class _Pipeline:
    """The ingest loop: a window of requests in flight, busy batches waiting to go again."""

    def __init__(
        self, client: Client, report: IngestReport, progress: Progress, *, window: int,
        busy_limit_s: float, clock: Callable[[], float], sleep: Callable[[float], None],
    ) -> None:  # fmt: skip
        self.client, self.report, self.progress = client, report, progress
        self.window, self.busy_limit_s = window, busy_limit_s
        self.clock, self.sleep = clock, sleep
        self.in_flight: dict[int, tuple[Batch, float | None]] = {}  # id -> batch, first busy
        self.waiting: deque[tuple[float, Batch, float]] = deque()  # due, batch, first busy

    def run(self, batches: Iterable[Batch]) -> None:
        source = iter(batches)
        more = True
        while True:
            if len(self.in_flight) < self.window:
                if self.waiting and self.waiting[0][0] <= self.clock():
                    _, again, first_busy = self.waiting.popleft()
                    self._send(again, first_busy)
                    continue
                if more and not self.waiting:  # while the daemon is busy, send nothing new
                    batch = next(source, None)
                    more = batch is not None
                    if batch is not None:
                        self._send(batch, None)
                    continue
            if self.in_flight:
                self._receive()
            elif self.waiting:
                self.sleep(max(0.0, self.waiting[0][0] - self.clock()))
            else:
                return

    def unacknowledged(self) -> int:
        batches = [b for b, _ in self.in_flight.values()] + [b for _, b, _ in self.waiting]
        return sum(len(b.events) for b in batches)

    def _send(self, batch: Batch, first_busy: float | None) -> None:
        if not batch.events:  # only blank or locally rejected lines
            self.progress.update(batch.span)
            return
        events = msgspec.Raw(b"[" + b",".join(batch.events) + b"]")
        self.in_flight[self.client.send("ingest", events=events)] = (batch, first_busy)

    def _receive(self) -> None:
        answer = self.client.receive()
        entry = self.in_flight.pop(answer.get("id"), None)  # type: ignore[arg-type]
        error = answer.get("error") or {}
        if entry is None:  # not an answer to a batch: the connection is ending
            raise RequestFailedError(error.get("code", "?"), error.get("message", ""), answer)
        batch, first_busy = entry
        if answer.get("ok"):
            self._acknowledged(batch, answer)
            return
        now = self.clock()
        if error.get("code") == "busy" and now - (first_busy or now) < self.busy_limit_s:
            self.report.busy += 1
            due = now + error.get("retry_after_ms", 100) / 1000
            self.waiting.append((due, batch, first_busy or now))
            return
        self.report.failed += len(batch.events)
        self.report.failure = self.report.failure or f"{error.get('code')}: {error.get('message')}"
        self.progress.update(batch.span)

    def _acknowledged(self, batch: Batch, answer: dict[str, Any]) -> None:
        accepted, duplicates = answer.get("accepted", 0), answer.get("duplicates", 0)
        rejected = answer.get("rejected", [])
        self.report.accepted += accepted
        self.report.duplicates += duplicates
        for rejection in rejected:
            index = rejection.get("index") or 0
            reason = _INDEX_PREFIX.sub("", rejection.get("error", "rejected"))
            self.report.reject(batch.positions[index], reason)
        # the answer has no count for events the log keeps out (of forgotten users)
        self.report.dropped += max(0, len(batch.events) - accepted - duplicates - len(rejected))
        self.progress.update(batch.span)


# ---------------------------------------------------------------- rendering


def render_ingest(name: str, report: IngestReport) -> str:
    """The ingest summary: counts, the first rejections with their positions, failures."""
    counts = (
        f"{report.accepted} accepted, {report.duplicates} duplicates, {report.rejected} rejected"
    )
    lines = [f"{name}: {counts}"]
    lines += [f"  {report.unit} {position}: {reason}" for position, reason in report.reasons]
    if report.rejected > len(report.reasons):
        lines.append(f"  … and {report.rejected - len(report.reasons)} more rejected")
    if report.duplicates:
        lines.append(f"{report.duplicates} events had ids already in the log: nothing was added")
    if report.dropped:
        lines.append(
            f"{report.dropped} events were neither appended nor rejected "
            "(the log keeps out events of forgotten users)"
        )
    if report.busy:
        lines.append(f"the daemon was busy {report.busy} times; those batches were sent again")
    if report.failed:
        lines.append(f"{report.failed} events were not ingested")
    return "\n".join(lines)


def render_ranking(answer: dict[str, Any]) -> str:
    """A ``rank`` answer as a table: rank, item, score (and the score's parts)."""
    explain: list[dict[str, Any]] = answer.get("explain") or []
    # the numeric parts: not the flags, nor the policies' entries or the position
    parts = [k for k, v in explain[0].items()
             if isinstance(v, int | float) and not isinstance(v, bool) and k != "position"
             ] if explain else []  # fmt: skip
    header = ["rank", "item", "score", *parts] + (["model knows"] if explain else [])
    rows = []
    for n, (item, score) in enumerate(zip(answer["items"], answer["scores"], strict=True)):
        row = [str(n + 1), item, f"{score:.4f}"]
        if explain:
            row += [f"{explain[n][p]:.4f}" for p in parts]
            row.append(_model_knows(explain[n]))
        rows.append(row)
    footer = f"scored by {answer.get('source', '?')}; ranking_id {answer.get('ranking_id', '?')}"
    return _table(header, rows, left={1}) + "\n" + footer


def _model_knows(entry: dict[str, Any]) -> str:
    """yes, no, or the rule of the item's cold-start vector ("cold: category")."""
    if entry.get("known_to_model"):
        return "yes"
    cold = entry.get("cold_start")
    return f"cold: {cold}" if cold else "no"


def render_stats(stats: dict[str, Any]) -> str:
    """The ``stats`` answer as aligned ``key  value`` lines, nested keys dotted."""
    flat = dict(_flatten(stats))
    width = max(map(len, flat), default=0)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in flat.items())


def render_export(answer: dict[str, Any]) -> str:
    """
    An ``export`` answer as a table (item, counts, popularity, CTR) and a footer.

    The footer gives the page's place among all items and the noise applied, if any.
    """
    columns = ("impressions", "clicks", "interactions", "popularity", "ctr")
    rows = [[item["item"], *(str(item[c]) for c in columns)] for item in answer["items"]]
    footer = f"{len(rows)} of {answer.get('total', '?')} items"
    if answer.get("next_offset") is not None:
        footer += f"; the next page starts at --offset {answer['next_offset']}"
    noise = answer.get("noise")
    if noise:
        footer += (f"; {noise.get('mechanism', '?')} noise, epsilon {noise.get('epsilon')}, "
                   f"sensitivity {noise.get('sensitivity')}")  # fmt: skip
    else:
        footer += "; no noise"
    return _table(["item", *columns], rows, left={0}) + "\n" + footer


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def render_user(user: str, view: dict[str, Any]) -> str:
    """A user's state: counters, purchases, recent items, strongest interests."""
    counts = ", ".join(f"{t} {n}" for t, n in view.get("counts", {}).items()) or "none"
    lines = [
        f"user {user}: {view.get('events', 0)} events, the last at {_when(view.get('last_ts'))}",
        f"  counts     {counts}",
        f"  purchased  {', '.join(view.get('purchased', [])) or 'nothing'}",
        "  recent (newest first):",
    ]
    lines += [f"    {r['item']:<16} {r['type']:<10} {_when(r['ts'])}" for r in view["recent"]]
    for title, key in (("item", "item_interest"), ("category", "category_interest")):
        top = sorted(view.get(key, {}).items(), key=lambda kv: -kv[1])[:10]
        if top:
            lines.append(f"  {title} interest: " + ", ".join(f"{k} {v:.3f}" for k, v in top))
    return "\n".join(lines)


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _table(header: list[str], rows: list[list[str]], *, left: set[int]) -> str:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if c in left else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join(line(r) for r in [header, *rows])
