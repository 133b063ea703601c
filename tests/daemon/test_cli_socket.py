"""
The command line over the socket: `rerankd rank | ingest | user | stats | forget`
as real processes against one real daemon per module (tests keep apart by their ids).
"""

from __future__ import annotations

import io
import json
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon._cli_socket import IngestReport, ingest, read_batches, render_ranking, render_stats

NOW = time.time()


def _event(eid: str, user: str | None, item: str, kind: str = "purchase") -> dict[str, Any]:
    event = {"id": eid, "type": kind, "user": user, "item": item, "ts": NOW - 60}
    return {k: v for k, v in event.items() if v is not None}


def _rows(table: str) -> list[list[str]]:
    """The rows of a `rerankd rank` table, header and footer left out."""
    return [line.split() for line in table.splitlines()[1:-1]]


# ------------------------------------------------------------------------------ rank


def test_rank_puts_the_purchased_item_first(shared_daemon: Any, rerankd: Any) -> None:
    """After purchases of one item, `rank` lists it first, the others in the given order."""
    with shared_daemon.client() as client:
        client.request("ingest", events=[_event(f"r1-{n}", f"r1-u{n}", "r1-c") for n in range(5)])
    done = rerankd(
        shared_daemon.tmp, "rank", "r1-viewer", "r1-a", "r1-b", "r1-c",
        "--config", str(shared_daemon.config),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [["1", "r1-c"], ["2", "r1-a"], ["3", "r1-b"]] == [r[:2] for r in _rows(done.stdout)]


def test_rank_explain_shows_parts_that_add_up(shared_daemon: Any, rerankd: Any) -> None:
    """With --explain each row has the score's parts; without a model they sum to the score."""
    with shared_daemon.client() as client:
        client.request("ingest", events=[_event(f"r2-{n}", f"r2-u{n}", "r2-c") for n in range(3)])
    done = rerankd(
        shared_daemon.tmp, "rank", "r2-viewer", "r2-a", "r2-c", "--explain", "-k", "1",
        "--config", str(shared_daemon.config),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    header = done.stdout.splitlines()[0].split()
    assert ["rank", "item", "score", "model", "popularity", "interest", "freshness"] == header[:7]
    (row,) = _rows(done.stdout)  # -k 1: one item
    assert row[1] == "r2-c"
    assert float(row[2]) == pytest.approx(sum(map(float, row[3:7])), abs=2e-4)
    assert float(row[4]) > 0


def test_rank_json_is_the_daemons_answer(shared_daemon: Any, rerankd: Any) -> None:
    """--json prints the answer as the daemon gave it: items, scores, ranking_id."""
    done = rerankd(
        shared_daemon.tmp, "rank", "r3-u", "r3-a", "r3-b", "--json",
        "--config", str(shared_daemon.config),
    )  # fmt: skip
    answer = json.loads(done.stdout)
    assert ["r3-a", "r3-b"] == answer["items"]
    assert answer["ranking_id"].startswith("r-")


# ---------------------------------------------------------------------------- ingest


def test_ingest_reports_rejected_lines_and_exits_1(
    shared_daemon: Any, rerankd: Any, tmp_path: Path
) -> None:
    """Bad lines are reported with their line numbers, the good ones accepted; exit 1."""
    lines = [
        json.dumps(_event("i1-1", "i1-u", "i1-a")),
        json.dumps(_event("i1-2", "i1-u", "i1-b")),
        "{not json",
        json.dumps(_event("i1-4", "i1-u", "i1-c")),
        json.dumps(_event("i1-5", None, "i1-d", kind="click")),  # a click needs a user
        "",
        json.dumps(_event("i1-7", "i1-u", "i1-e")),
    ]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    done = rerankd(
        tmp_path, "ingest", "events.jsonl", "--batch", "2",
        "--config", str(shared_daemon.config),
    )  # fmt: skip
    assert done.returncode == 1
    assert [
        "events.jsonl: 4 accepted, 0 duplicates, 2 rejected",
        "  line 3: json: malformed",
        "  line 5: user: required for type click",
    ] == done.stdout.splitlines()


def test_ingest_twice_reports_duplicates(shared_daemon: Any, rerankd: Any, tmp_path: Path) -> None:
    """Sending a file again adds nothing and says so: every event is a duplicate, exit 0."""
    events = [_event(f"i2-{n}", "i2-u", f"i2-{n}") for n in range(3)]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    args = ("ingest", "e.jsonl", "--config", str(shared_daemon.config))
    first, again = rerankd(tmp_path, *args), rerankd(tmp_path, *args)
    assert (0, 0) == (first.returncode, again.returncode)
    assert "e.jsonl: 3 accepted, 0 duplicates, 0 rejected" == first.stdout.splitlines()[0]
    assert "e.jsonl: 0 accepted, 3 duplicates, 0 rejected" == again.stdout.splitlines()[0]


@pytest.mark.parametrize(
    ("args", "shape"), [(("-",), "lines"), ((), "array")], ids=["dash-json-lines", "no-file-array"]
)
def test_ingest_reads_stdin(
    shared_daemon: Any, rerankd: Any, args: tuple[str, ...], shape: str
) -> None:
    """`-` or no SOURCE reads stdin, as JSON lines or one JSON array; the events land."""
    user = f"i3-{shape}"
    events = [_event(f"{user}-{n}", user, f"{user}-{n}", kind="view") for n in range(3)]
    text = json.dumps(events) if shape == "array" else "".join(json.dumps(e) + "\n" for e in events)
    done = rerankd(
        shared_daemon.tmp, "ingest", *args, "--config", str(shared_daemon.config), stdin=text
    )
    assert done.returncode == 0, done.stderr
    assert "stdin: 3 accepted, 0 duplicates, 0 rejected" == done.stdout.strip()
    with shared_daemon.client() as client:
        assert 3 == client.request("user", user=user)["user"]["events"]


def test_ingest_counts_events_kept_out(shared_daemon: Any, rerankd: Any, tmp_path: Path) -> None:
    """Events of a forgotten user are neither accepted nor rejected; the summary says so."""
    with shared_daemon.client() as client:
        client.request("ingest", events=[_event("i4-0", "i4-gone", "i4-a")])
        client.request("forget", user="i4-gone")
    events = [_event("i4-1", "i4-gone", "i4-a"), _event("i4-2", "i4-here", "i4-a")]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    done = rerankd(tmp_path, "ingest", "e.jsonl", "--config", str(shared_daemon.config))
    assert done.returncode == 0, done.stderr
    assert [
        "e.jsonl: 1 accepted, 0 duplicates, 0 rejected",
        "1 events were neither appended nor rejected (the log keeps out events of forgotten users)",
    ] == done.stdout.splitlines()


# ------------------------------------------------------------------- user, stats, forget


def test_user_over_the_socket(shared_daemon: Any, rerankd: Any) -> None:
    """`user` shows the daemon's view of a user, readable or as JSON."""
    with shared_daemon.client() as client:
        client.request(
            "ingest", events=[_event("u1-1", "u1", "u1-a"), _event("u1-2", "u1", "u1-b")]
        )
    config = ("--config", str(shared_daemon.config))
    view = json.loads(rerankd(shared_daemon.tmp, "user", "u1", "--json", *config).stdout)
    assert {"u1-a", "u1-b"} == {r["item"] for r in view["recent"]}
    readable = rerankd(shared_daemon.tmp, "user", "u1", *config).stdout.splitlines()
    assert readable[0].startswith("user u1: 2 events, the last at ")
    assert "  purchased  u1-a, u1-b" in readable or "  purchased  u1-b, u1-a" in readable


def test_stats_over_the_socket(shared_daemon: Any, rerankd: Any) -> None:
    """`stats --json` prints the daemon's counters."""
    with shared_daemon.client() as client:
        expected = client.request("stats")["events"]["log_offset"]
    done = rerankd(shared_daemon.tmp, "stats", "--json", "--config", str(shared_daemon.config))
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert expected <= stats["events"]["log_offset"]
    assert {"id", "ok"}.isdisjoint(stats)


def test_export_over_the_socket(shared_daemon: Any, rerankd: Any) -> None:
    """`export --json` pages through the items; the readable form is a table."""
    with shared_daemon.client() as client:
        client.request("ingest", events=[_event("x1-1", "x1", "x1-a", kind="click")])
        total = client.request("export", limit=1)["total"]
    config = ("--config", str(shared_daemon.config))
    done = rerankd(shared_daemon.tmp, "export", "--json", "--limit", "100000", *config)
    assert done.returncode == 0, done.stderr
    page = json.loads(done.stdout)
    [clicked] = [it for it in page["items"] if it["item"] == "x1-a"]
    assert (1, 1, None) == (clicked["clicks"], clicked["interactions"], page["next_offset"])
    assert total <= page["total"]
    readable = rerankd(shared_daemon.tmp, "export", "--limit", "1", *config).stdout.splitlines()
    assert readable[0].split() == ["item", "impressions", "clicks", "interactions",
                                   "popularity", "ctr"]  # fmt: skip
    assert readable[-1].startswith("1 of ")


def test_render_stats_dots_nested_keys() -> None:
    """Readable stats: one aligned line per value, nested keys dotted."""
    text = render_stats({"users": 3, "events": {"ingested": 12, "busy": 0}})
    assert ["users            3", "events.ingested  12", "events.busy      0"] == text.splitlines()


def test_render_ranking_shows_numeric_parts_and_what_the_model_knows() -> None:
    """The explain table has the numeric parts as columns; a cold-start item shows its rule."""
    explain = [
        {"model": 0.5, "popularity": 0.25, "known_to_model": False, "cold_start": "category",
         "policies": {"mmr": {}}, "position": 0},
        {"model": 0.0, "popularity": 0.5, "known_to_model": True, "policies": {}, "position": 1},
    ]  # fmt: skip
    text = render_ranking({"items": ["new", "old"], "scores": [0.75, 0.5], "explain": explain,
                           "source": "model", "ranking_id": "r-1"})  # fmt: skip
    header, first, second = text.splitlines()[:3]
    assert ["rank", "item", "score", "model", "popularity", "model", "knows"] == header.split()
    assert first.split()[-2:] == ["cold:", "category"]
    assert second.split()[-1] == "yes"


def test_forget_over_the_socket(shared_daemon: Any, rerankd: Any) -> None:
    """`forget --yes` erases the user in the daemon; `user` then fails with not_found."""
    with shared_daemon.client() as client:
        client.request("ingest", events=[_event("f1-1", "f1", "f1-a")])
    config = ("--config", str(shared_daemon.config))
    done = rerankd(shared_daemon.tmp, "forget", "f1", "--yes", *config)
    assert done.returncode == 0, done.stderr
    assert "erased user f1 everywhere; a tombstone is kept\n" == done.stdout
    gone = rerankd(shared_daemon.tmp, "user", "f1", *config)
    assert (1, "rerankd: not_found: user: unknown\n") == (gone.returncode, gone.stderr)


def test_forget_asks_first(shared_daemon: Any, rerankd: Any) -> None:
    """Without --yes, `forget` asks; answering no erases nothing and exits 1."""
    with shared_daemon.client() as client:
        client.request("ingest", events=[_event("f2-1", "f2", "f2-a")])
    done = rerankd(shared_daemon.tmp, "forget", "f2", "--config", str(shared_daemon.config),
                   stdin="n\n")  # fmt: skip
    assert done.returncode == 1
    assert "erase user f2 everywhere?" in done.stdout
    with shared_daemon.client() as client:
        assert 1 == client.request("user", user="f2")["user"]["events"]


# ------------------------------------------------------------------------ no daemon


@pytest.mark.parametrize(
    ("args", "hint"),
    [(("user", "u"), ", or pass --offline"), (("rank", "u", "a"), ""), (("stats",), "")],
    ids=["user", "rank", "stats"],
)
def test_no_daemon_is_one_line_and_exit_1(
    rerankd: Any, tmp_path: Path, args: tuple[str, ...], hint: str
) -> None:
    """Without a daemon a socket command prints one line naming the socket, and exits 1."""
    done = rerankd(tmp_path, *args)
    assert 1 == done.returncode
    expected = f"rerankd: no daemon at var/rerankd.sock (start it with `rerankd run`{hint})\n"
    assert expected == done.stderr
    assert "" == done.stdout


def test_stale_socket_file_is_no_daemon(rerankd: Any, tmp_path: Path) -> None:
    """A socket file nobody listens on (a killed daemon) reads as no daemon, via --socket."""
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    done = rerankd(tmp_path, "stats", "--socket", str(path))
    assert (1, f"rerankd: no daemon at {path} (start it with `rerankd run`)\n") == (
        done.returncode,
        done.stderr,
    )


# ------------------------------------------------- the ingest loop, at the client seam


class _Progress:
    total: float | None = None

    def __init__(self) -> None:
        self.done = 0

    def update(self, n: float = 1) -> None:
        self.done += int(n)

    def refresh(self) -> None:
        pass


class _FakeClient:
    """
    Answers ingest requests as the daemon would, in order: the first one ``busy``
    (``busy_first``), and after ``drop_after`` answers the connection is lost.
    """

    def __init__(self, *, busy_first: bool = True, drop_after: int | None = None) -> None:
        self.sent: list[list[str]] = []
        self.answers: deque[dict[str, Any]] = deque()
        self.busy_first = busy_first
        self.drop_after = drop_after
        self.received = 0

    def send(self, op: str, **fields: Any) -> int:
        assert op == "ingest"
        ids = [e["id"] for e in msgspec.json.decode(bytes(fields["events"]))]
        self.sent.append(ids)
        request_id = len(self.sent)
        if self.busy_first and request_id == 1:
            error = {"code": "busy", "message": "the event log's writer is behind",
                     "retry_after_ms": 50}  # fmt: skip
            self.answers.append({"id": request_id, "ok": False, "error": error})
        else:
            answer = {"accepted": len(ids), "duplicates": 0, "rejected": []}
            self.answers.append({"id": request_id, "ok": True, **answer})
        return request_id

    def receive(self) -> dict[str, Any]:
        if self.drop_after is not None and self.received >= self.drop_after:
            msg = "the daemon closed the connection"
            raise ConnectionError(msg)
        self.received += 1
        return self.answers.popleft()


def _run_ingest(client: _FakeClient, n_events: int) -> tuple[IngestReport, _Progress, list[float]]:
    lines = "".join(json.dumps(_event(f"b-{k}", "b", "b-a")) + "\n" for k in range(n_events))
    stream = io.BufferedReader(io.BytesIO(lines.encode()))  # type: ignore[arg-type]
    report, progress, sleeps = IngestReport(), _Progress(), []
    clock = [0.0]

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    batches = read_batches(stream, report, progress, size=2, max_line_bytes=1 << 20)
    ingest(client, batches, report, progress, window=4, clock=lambda: clock[0], sleep=sleep)  # type: ignore[arg-type]
    return report, progress, sleeps


def test_busy_batch_is_sent_again_and_counted_once() -> None:
    """A batch answered busy goes again after retry_after_ms; every event counts once."""
    client = _FakeClient()
    report, progress, sleeps = _run_ingest(client, 5)
    assert [["b-0", "b-1"], ["b-2", "b-3"], ["b-4"], ["b-0", "b-1"]] == client.sent
    assert [0.05] == sleeps
    assert (5, 0, 0, 1, 0) == (
        report.accepted, report.duplicates, report.rejected, report.busy, report.failed
    )  # fmt: skip
    assert 5 == progress.done


def test_lost_connection_reports_what_was_not_acknowledged() -> None:
    """When the daemon goes away mid-ingest, the report says how many events were unanswered."""
    client = _FakeClient(busy_first=False, drop_after=1)
    report, _, _ = _run_ingest(client, 5)
    assert not report.ok
    assert report.failure is not None
    assert report.failure.startswith("stopped: the daemon closed the connection")
    assert report.accepted + report.failed == 5
