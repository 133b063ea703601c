"""
The feeds' side of the daemon without a broker: the writer's dead letters, FeedSink's
durable append (and its waiting while the writer is behind or the disk refuses),
stored positions, secrets and backoff.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from daemon.feeds import Backoff, FeedSink, read_secret
from daemon.metrics import Metrics
from eventstore import EventDecoder, GroupCommitter, Store, StoreFullError


def _committer(store: Store, **kwargs: Any) -> GroupCommitter:
    return GroupCommitter(store.append, dead_letter_sink=store.log.dead_letters, **kwargs)


def test_writer_commits_dead_letters_of_each_source_with_the_group(
    store: Store, make_event: Any
) -> None:
    committer = _committer(store)
    try:
        a = committer.submit([make_event(n=1)], dead_letters=[(b"{bad", "not JSON")],
                             source="mqtt")  # fmt: skip
        b = committer.submit([make_event(n=2)], positions={("kafka:t", "0"): 7},
                             dead_letters=[(b"[]x", "not an event")], source="kafka")  # fmt: skip
        assert a.result(10).status == ["accepted"]
        assert b.result(10).status == ["accepted"]
    finally:
        committer.close()
    dead = {(d.source, d.raw, d.reason) for d in store.log.read_dead_letters()}
    assert dead == {("mqtt", b"{bad", "not JSON"), ("kafka", b"[]x", "not an event")}
    assert store.log.positions("kafka:t") == {("kafka:t", "0"): 7}


def test_dead_letters_need_a_sink_and_a_source(store: Store, make_event: Any) -> None:
    plain = GroupCommitter(store.append)
    with_sink = _committer(store)
    try:
        with pytest.raises(ValueError, match="dead_letter_sink"):
            plain.submit([make_event()], dead_letters=[(b"x", "bad")], source="mqtt")
        with pytest.raises(ValueError, match="source"):
            with_sink.submit([make_event()], dead_letters=[(b"x", "bad")])
    finally:
        plain.close()
        with_sink.close()


def test_decode_keeps_good_events_and_names_what_is_bad(decoder: EventDecoder) -> None:
    sink = FeedSink(None, decoder, Path("/nonexistent/events.db"))
    good = {"type": "click", "id": "e-1", "user": "u-1", "item": "i-1", "ts": 1764250001.0}
    bad = {"type": "click", "id": "e-2", "item": "i-1", "ts": 1764250002.0}  # no user
    events, rejected = sink.decode(json.dumps([good, bad]).encode())
    assert [e.id for e in events] == ["e-1"]
    assert len(rejected) == 1
    assert b'"e-2"' in rejected[0][0]
    assert "user" in rejected[0][1]
    events, rejected = sink.decode(b"\xff not json")
    assert events == []
    assert rejected[0][0] == b"\xff not json"


def test_decode_passes_the_events_through_the_privacy_plugins(decoder: EventDecoder) -> None:
    """Decoded events come out as the privacy step returns them; rejections as they were."""
    seen: list[list[str]] = []

    def privacy(events: Any) -> list[Any]:
        seen.append([e.id for e in events])
        return [e for e in events if e.id != "e-2"]

    sink = FeedSink(None, decoder, Path("/nonexistent/events.db"), privacy=privacy)
    good = [{"type": "click", "id": f"e-{n}", "user": "u-1", "item": "i-1",
             "ts": 1764250001.0} for n in (1, 2)]  # fmt: skip
    events, rejected = sink.decode(json.dumps([*good, {"type": "click", "id": "e-3"}]).encode())
    assert (["e-1"], [["e-1", "e-2"]]) == ([e.id for e in events], seen)
    assert 1 == len(rejected)


def test_a_failing_privacy_plugin_dead_letters_the_payload(decoder: EventDecoder) -> None:
    """Events a privacy plugin failed on are never returned: the payload is a dead letter."""

    def privacy(events: Any) -> list[Any]:
        raise RuntimeError(len(events))

    sink = FeedSink(None, decoder, Path("/nonexistent/events.db"), privacy=privacy)
    payload = json.dumps({"type": "click", "id": "e-1", "user": "u", "item": "i",
                          "ts": 1764250001.0}).encode()  # fmt: skip
    assert ([], [(payload, "privacy: a privacy plugin failed (RuntimeError)")]) == sink.decode(
        payload
    )


async def test_append_waits_while_the_writer_is_behind(store: Store, make_event: Any) -> None:
    """A full writer queue makes append wait (the feed pauses), not fail or drop."""
    release = threading.Event()

    def slow_append(events: Any, **kwargs: Any) -> Any:
        release.wait(30)
        return store.append(events, **kwargs)

    committer = GroupCommitter(slow_append, max_pending=1,
                               dead_letter_sink=store.log.dead_letters)  # fmt: skip
    metrics = Metrics()
    sink = FeedSink(committer, EventDecoder(), store.log.path, metrics)
    try:
        first = asyncio.ensure_future(sink.append([make_event(n=1)], source="kafka"))
        await asyncio.sleep(0.05)  # the writer holds the first request
        second = asyncio.ensure_future(sink.append([make_event(n=2)], source="kafka"))
        third = asyncio.ensure_future(sink.append([make_event(n=3)], source="kafka"))
        await asyncio.sleep(0.3)  # the queue holds one; the third cannot get in
        assert [f.done() for f in (first, second, third)] == [False] * 3
        release.set()
        results = await asyncio.wait_for(asyncio.gather(first, second, third), 10)
    finally:
        release.set()
        committer.close()
    assert [r.status for r in results] == [["accepted"]] * 3
    assert sink.paused_s > 0.2
    assert metrics.total("rerankd_feed_events_total", feed="kafka", outcome="accepted") == 3
    assert store.log.count() == 3


async def test_append_retries_when_the_disk_refuses(store: Store, make_event: Any) -> None:
    """Nothing is committed by a refused write, so retrying cannot double anything."""
    refusals = [StoreFullError(str(store.log.path), "SQLITE_FULL")]

    def flaky_append(events: Any, **kwargs: Any) -> Any:
        if refusals:
            raise refusals.pop()
        return store.append(events, **kwargs)

    committer = GroupCommitter(flaky_append, dead_letter_sink=store.log.dead_letters)
    sink = FeedSink(committer, EventDecoder(), store.log.path, retry_s=0.05)
    try:
        result = await asyncio.wait_for(sink.append(
            [make_event(n=1)], source="mqtt", positions={("kafka:t", "0"): 3}), 10)  # fmt: skip
    finally:
        committer.close()
    assert result.status == ["accepted"]
    assert not refusals
    assert store.log.count() == 1
    assert sink.stored_positions("kafka:t") == {"0": 3}
    assert sink.stored_positions("kafka:other") == {}


async def test_append_holds_while_storage_is_unavailable(store: Store, make_event: Any) -> None:
    """
    While the writer holds a storage condition the append waits, paused and without
    committing anything (so a feed acknowledges nothing); once the probe finds the disk
    writable again the same batch commits, once.
    """
    full = threading.Event()
    full.set()

    def append(events: Any, **kwargs: Any) -> Any:
        if full.is_set():
            raise StoreFullError(str(store.log.path), "SQLITE_FULL")
        return store.append(events, **kwargs)

    def probe() -> None:
        if full.is_set():
            raise StoreFullError(str(store.log.path), "SQLITE_FULL")

    committer = GroupCommitter(append, dead_letter_sink=store.log.dead_letters, probe=probe,
                               probe_min_s=0.01, probe_max_s=0.05)  # fmt: skip
    sink = FeedSink(committer, EventDecoder(), store.log.path, retry_s=30.0)
    try:
        task = asyncio.ensure_future(sink.append([make_event(n=1)], source="mqtt",
                                                 positions={("kafka:t", "0"): 3}))  # fmt: skip
        await asyncio.sleep(0.5)
        held = (task.done(), set(sink.paused), store.log.count(), committer.storage_available)
        full.clear()
        result = await asyncio.wait_for(task, 10)  # well before retry_s: the condition ended
    finally:
        full.clear()
        committer.close()
    assert (False, {"mqtt"}, 0, False) == held
    assert (["accepted"], set(), 1) == (result.status, sink.paused, store.log.count())
    assert sink.paused_s >= 0.4
    assert {"0": 3} == sink.stored_positions("kafka:t")


def test_read_secret_prefers_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd\n")
    (tmp_path / "mqtt-password").write_text("from-cwd\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert read_secret("mqtt-password", what="[mqtt].password_file") == "from-systemd"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert read_secret("mqtt-password", what="[mqtt].password_file") == "from-cwd"
    with pytest.raises(ValueError, match=r"\[mqtt\]\.password_file: cannot read") as info:
        read_secret("absent", what="[mqtt].password_file")
    assert "from-" not in str(info.value)


def test_backoff_grows_with_jitter_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(0.5, 4.0, rng=random.Random(7))  # noqa: S311
    delays = [backoff.next() for _ in range(30)]
    assert all(0.25 <= d <= 4.0 for d in delays)
    assert max(delays[6:]) > 2.0  # grew beyond the first steps' caps
    assert len({round(d, 6) for d in delays}) > 20  # jittered, not a fixed ladder
    backoff.reset()
    assert backoff.next() <= 0.5
