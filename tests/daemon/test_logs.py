"""The log set-up: the broker clients' standard-library records, rendered and thinned."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from daemon import logs


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    yield out
    logs.configure_logging()  # back to stderr for the other tests


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_library_warnings_come_out_as_json_lines(stream: io.StringIO) -> None:
    logs.configure_logging(stream=stream)
    logging.getLogger("aiokafka.conn").warning("Unable to connect to %s", "node 1")
    [line] = _lines(stream)
    assert line["event"] == "Unable to connect to node 1"
    assert line["level"] == "warning"
    assert line["logger"] == "aiokafka.conn"
    assert "timestamp" in line


def test_library_info_is_dropped(stream: io.StringIO) -> None:
    logs.configure_logging(stream=stream)
    logging.getLogger("aiokafka.consumer").info("joined group")
    assert stream.getvalue() == ""


def test_a_repeated_library_message_is_logged_once_per_interval(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    logs.configure_logging(stream=stream)
    conn = logging.getLogger("aiokafka.conn")
    for _ in range(50):
        conn.error("Unable to connect to node with id %s", 1)
    conn.error("a different message")
    clock[0] += logs.LIBRARY_REPEAT_S + 1
    conn.error("Unable to connect to node with id %s", 1)
    events = [line["event"] for line in _lines(stream)]
    assert events == [
        "Unable to connect to node with id 1",
        "a different message",
        "Unable to connect to node with id 1",
    ]


def test_configuring_twice_keeps_one_handler(stream: io.StringIO) -> None:
    logs.configure_logging(stream=stream)
    logs.configure_logging(stream=stream)
    logging.getLogger("x").warning("once")
    assert len(_lines(stream)) == 1
