"""
Privacy in the real daemon: `rerankd run` processes (tests/daemons.py) fed through the
socket, the real Mosquitto and the real Kafka (tests/conftest.py), checked through the
socket, the metrics endpoint and the bytes of every file the daemon wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import signal
import sqlite3
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from brokers import KafkaBroker, MqttBroker, free_ports, unique_name
from daemons import Daemon, poll, user_view

from daemon.client import RequestFailedError
from daemon.feeds.kafka import publish as kafka_publish
from daemon.feeds.mqtt import publish as mqtt_publish

NOW = time.time()
ALICE, BOB, CAROL = "alice@example.com", "bob@example.org", "carol@example.net"
#: Personal data in the events' context that mask must keep out of every file.
IP, PHONE = "203.0.113.7", "+44 20 7946 0958"
CONTEXT = {"email": ALICE, "ip": IP, "note": f"call {PHONE}", "page": "shoes"}
#: Bound on waiting for the feeds to deliver.
TIMEOUT_S = 90
CANDIDATES = ["hat-1", "shoe-2"]


def event(eid: str, kind: str, user: str, item: str, **fields: Any) -> dict[str, Any]:
    return {"id": eid, "type": kind, "user": user, "item": item, "ts": NOW - 60, **fields}


def catalogue() -> list[dict[str, Any]]:
    """Two shoes and a hat: a user who likes one shoe gets the other before the hat."""
    items = [("shoe-1", "shoes"), ("shoe-2", "shoes"), ("hat-1", "hats")]
    return [{"id": f"item-{i}", "type": "item", "item": i, "ts": NOW - 120,
             "fields": {"category": c}} for i, c in items]  # fmt: skip


def pseudonym(daemon: Daemon, user: str) -> str:
    """What the daemon stores for ``user``: computed here from its generated key."""
    key = (daemon.tmp / "data" / "pseudonymize.key").read_bytes().rstrip(b"\n")
    return "p:" + hmac.new(key, user.encode(), hashlib.sha256).hexdigest()[:32]


def files_holding(directory: Path, needles: list[bytes]) -> dict[str, list[bytes]]:
    """{file: the needles it contains} over every regular file under ``directory``."""
    found: dict[str, list[bytes]] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            hits = [n for n in needles if n in data]
            if hits:
                found[str(path.relative_to(directory))] = hits
    return found


def query(daemon: Daemon, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` on the daemon's log, over a read-only connection."""
    uri = f"file:{daemon.tmp / 'data' / 'events.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        return db.execute(sql, args).fetchall()


def wait_until(read: Callable[[], Any], done: Callable[[Any], bool],
               timeout_s: float = TIMEOUT_S) -> Any:  # fmt: skip
    """``read()`` until ``done(value)``; fails with the last value after the timeout."""
    value = poll(read, done, timeout_s)
    if not done(value):
        pytest.fail(f"timed out; last value: {value!r}")
    return value


def interactions(view: dict[str, Any] | None) -> set[str]:
    return {r["type"] for r in view["recent"]} if view else set()


# ------------------------------------------------------------------- every path in


@pytest.mark.brokers
def test_raw_ids_and_masked_data_reach_no_file_over_any_path(
    mqtt_broker: MqttBroker, kafka_broker: KafkaBroker, start: Callable[..., Daemon]
) -> None:
    """
    Events of raw ids with personal data in their context arrive through the socket,
    MQTT and Kafka, and answers are logged as impressions. One raw id is one user
    across the three paths (``user`` and ``rank`` by raw id show and use all of its
    events); no file the daemon wrote (log, WAL, SHM, snapshots, key, its log on
    stdout), no ``stats`` answer and no Prometheus page holds a raw id or a masked
    value, running or stopped; the log's users are all pseudonyms.
    """
    topic, (port,) = unique_name("events"), free_ports(1)
    asyncio.run(kafka_broker.create_topic(topic, partitions=2))
    group = unique_name("group")
    daemon = start(
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
        f'[mqtt]\nurl = "mqtt://{mqtt_broker.bootstrap}"\ntopics = ["{topic}"]\n'
        f'client_id = "{unique_name("rerankd")}"\nreconnect_min_s = 0.1\n'
        f'[kafka]\nbootstrap = "{kafka_broker.bootstrap}"\ntopics = ["{topic}"]\n'
        f'group_id = "{group}"\ninstance_id = "{group}-a"\nsession_timeout_s = 15.0\n'
        '[plugins]\nprivacy = ["pseudonymize", "mask"]\n'
    )
    wait_until(lambda: feed_connected(daemon, "mqtt"), bool)  # subscribed before publishing
    with daemon.client() as client:
        socket_events = [*catalogue(), event("s-1", "click", ALICE, "shoe-1", context=CONTEXT)]
        assert 4 == client.request("ingest", events=socket_events)["accepted"]
    published = [event("m-1", "purchase", ALICE, "shoe-1", context=CONTEXT),
                 event("m-2", "view", BOB, "hat-1", context={"ip": IP})]  # fmt: skip
    assert 2 == asyncio.run(mqtt_publish(f"mqtt://{mqtt_broker.bootstrap}", topic,
                                         [json.dumps(e).encode() for e in published]))  # fmt: skip
    produced = [event("k-1", "cart", ALICE, "shoe-1", context=CONTEXT),
                event("k-2", "view", CAROL, "hat-1", context={"note": PHONE})]  # fmt: skip
    assert 2 == asyncio.run(kafka_publish(kafka_broker.bootstrap, topic,
                                          [json.dumps(e).encode() for e in produced]))  # fmt: skip

    view = wait_until(lambda: user_view(daemon, ALICE),
                      lambda v: interactions(v) == {"click", "purchase", "cart"})  # fmt: skip
    wait_until(lambda: query(daemon, "SELECT count(*) FROM events")[0][0], lambda n: n == 8)
    with daemon.client() as client:
        alice = client.request("rank", user=ALICE, candidates=CANDIDATES)["items"]
        newcomer = client.request("rank", user="newcomer", candidates=CANDIDATES)["items"]
        stats = json.dumps(client.request("stats"))
    wait_until(lambda: user_view(daemon, ALICE), lambda v: v["counts"].get("impression") == 1)
    prometheus = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()

    needles = [ALICE.encode(), BOB.encode(), CAROL.encode(), IP.encode(), PHONE.encode()]
    running = files_holding(daemon.tmp, needles)
    written = {str(p.relative_to(daemon.tmp)) for p in daemon.tmp.rglob("*") if p.is_file()}
    users = {row[0] for row in query(daemon, "SELECT DISTINCT user FROM events")}
    bodies = [json.loads(row[0]) for row in query(daemon, "SELECT body FROM events")]
    assert 0 == daemon.stop()
    stopped = files_holding(daemon.tmp, needles)

    assert (["shoe-2", "hat-1"], CANDIDATES) == (alice, newcomer)
    assert {"click": 1, "purchase": 1, "cart": 1} == {
        k: v for k, v in view["counts"].items() if k != "impression"
    }
    assert ({}, {}) == (running, stopped)
    assert not any(n.decode() in stats for n in needles)
    assert not any(n in prometheus for n in needles)
    # None: the item events; "newcomer": the impression record of its rank
    assert {None, *(pseudonym(daemon, u) for u in (ALICE, BOB, CAROL, "newcomer"))} == users
    contexts = [b["context"] for b in bodies if b.get("context")]
    assert 5 == len(contexts)
    assert {"ip": "[masked]", "note": "call [masked]", "page": "shoes"} == contexts[0]
    assert all("email" not in c for c in contexts)
    # what was searched: the log with its WAL and SHM while running, a snapshot once stopped
    assert {"data/events.db", "data/events.db-wal", "data/events.db-shm", "daemon.log"} <= written
    assert list((daemon.tmp / "data" / "snapshots").glob("*.snap"))


def feed_connected(daemon: Daemon, feed: str) -> bool:
    with daemon.client() as client:
        return bool(client.request("stats")["feeds"][feed]["connected"])


# ---------------------------------------------------------------- one key, one user


def test_the_mapping_survives_a_restart(start: Callable[..., Daemon]) -> None:
    """
    Stored under its pseudonym (computed here from the daemon's key), a raw id reaches
    the same state after a restart: ``user`` shows the same events, ``rank`` uses them.
    """
    daemon = start()
    with daemon.client() as client:
        client.request("ingest", events=[*catalogue(), event("e-1", "purchase", ALICE, "shoe-1")])
        client.request("rank", user=ALICE, candidates=CANDIDATES)  # an impression record too
    before = wait_until(lambda: user_view(daemon, ALICE), lambda v: "impression" in v["counts"])
    assert 0 == daemon.stop()
    stored = {row[0] for row in query(daemon, "SELECT DISTINCT user FROM events")}

    daemon = start()
    after = user_view(daemon, ALICE)
    with daemon.client() as client:
        ranked = client.request("rank", user=ALICE, candidates=CANDIDATES)["items"]
    assert 0 == daemon.stop()

    assert {None, pseudonym(daemon, ALICE)} == stored
    assert before == after
    assert ["shoe-2", "hat-1"] == ranked


# ------------------------------------------------------------------------ erasure


def test_forget_by_raw_id_leaves_no_trace(start: Callable[..., Daemon]) -> None:
    """
    ``forget`` by raw id erases the pseudonym's events (its rows, its bytes in every
    file, its state and impressions); a later event for the raw id is refused as erased.
    """
    daemon = start()
    pseudo = pseudonym(daemon, ALICE)
    with daemon.client() as client:
        history = [event(f"alice-evt-{n}", "click", ALICE, f"shoe-{n % 2 + 1}") for n in range(20)]
        keep = [event(f"keep-evt-{n}", "view", BOB, "hat-1") for n in range(5)]
        client.request("ingest", events=[*catalogue(), *history, *keep])
        client.request("rank", user=ALICE, candidates=CANDIDATES)
        wait_until(lambda: user_view(daemon, ALICE), lambda v: "impression" in v["counts"])
        client.request("forget", user=ALICE)
        again = client.request("ingest", events=[event("late-1", "click", ALICE, "shoe-1")])
        with pytest.raises(RequestFailedError) as gone:
            client.request("user", user=ALICE)
    rows = query(daemon, "SELECT count(*) FROM events WHERE user = ?", pseudo)[0][0]
    kept = query(daemon, "SELECT count(*) FROM events WHERE user = ?", pseudonym(daemon, BOB))
    assert 0 == daemon.stop()

    assert (0, 5) == (rows, kept[0][0])
    assert (0, 1) == (again["accepted"], again["erased"])
    assert "not_found" == gone.value.code
    assert {} == files_holding(daemon.tmp, [pseudo.encode(), b"alice-evt-", ALICE.encode()])


# ---------------------------------------------------------------------- the key


def key_file(path: Path, byte: bytes) -> Path:
    path.write_bytes(byte * 32)
    path.chmod(0o600)
    return path


def test_sighup_rebuilds_the_plugins_but_refuses_another_key(start: Callable[..., Daemon],
                                                             tmp_path: Path) -> None:  # fmt: skip
    """
    A SIGHUP with a new [plugins.mask] table applies it to the next events; one that
    would change the pseudonymization key is refused and logged, and nothing changes.
    """
    k1, k2 = key_file(tmp_path / "k1", b"a"), key_file(tmp_path / "k2", b"b")
    plugins = '[plugins]\nprivacy = ["pseudonymize", "mask"]\n[plugins.pseudonymize]\n'
    daemon = start(f'{plugins}key_file = "{k1}"\n')
    log = daemon.tmp / "daemon.log"
    with daemon.client() as client:
        client.request("ingest", events=[event("e-1", "click", ALICE, "i", context={"page": "p"})])
        config = daemon.config.read_text()
        daemon.config.write_text(config + '[plugins.mask]\ndrop = ["page"]\n')
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(log.read_text, lambda text: '"reloaded"' in text)
        client.request("ingest", events=[event("e-2", "click", ALICE, "i", context={"page": "p"})])
        daemon.config.write_text(config.replace(str(k1), str(k2)))
        daemon.proc.send_signal(signal.SIGHUP)
        refused = wait_until(log.read_text, lambda text: '"reload_refused"' in text)
        client.request("ingest", events=[event("e-3", "click", ALICE, "i", context={"page": "p"})])
        view = client.request("user", user=ALICE)["user"]
    contexts = [json.loads(b)["context"] for (b,) in query(daemon, "SELECT body FROM events")]
    assert 0 == daemon.stop()

    assert [{"page": "p"}, {}, {}] == contexts  # e-3: the reloaded mask still runs
    assert 3 == view["events"]  # one user throughout: the key did not change
    assert "another pseudonymization key" in refused
    assert k1.read_bytes() not in log.read_bytes()


def test_a_start_with_another_key_is_refused(start: Callable[..., Daemon],
                                             tmp_path: Path) -> None:  # fmt: skip
    """A log written under one key makes a start under another fail, saying why."""
    k1, k2 = key_file(tmp_path / "k1", b"a"), key_file(tmp_path / "k2", b"b")
    daemon = start(f'[plugins.pseudonymize]\nkey_file = "{k1}"\n')
    with daemon.client() as client:
        client.request("ingest", events=[event("e-1", "click", ALICE, "i")])
    assert 0 == daemon.stop()
    again = Daemon(tmp_path, f'[plugins.pseudonymize]\nkey_file = "{k2}"\n')
    try:
        code = again.proc.wait(timeout=120)
    finally:
        again.close()
    output = (tmp_path / "daemon.log").read_text()
    assert 1 == code
    assert "the privacy plugins map user ids otherwise than when this log was written" in output


@pytest.mark.brokers
def test_forget_through_mqtt_and_kafka_leaves_no_trace_and_survives_a_replay(
    mqtt_broker: MqttBroker, kafka_broker: KafkaBroker, start: Callable[..., Daemon]
) -> None:
    """
    A ``forget`` event by raw id from MQTT (for one user) and from Kafka (for another)
    erases each as the socket's does: no row, no byte of the pseudonym, the raw id or
    the event ids in any file. A replay of their whole history through the feeds, and
    newer events, are refused by the tombstones, also after a restart.
    """
    dave, erin = "dave@example.com", "erin@example.com"
    topic, client_id = unique_name("events"), unique_name("rerankd")
    # one partition: a record after erin's on the topic is read after it
    asyncio.run(kafka_broker.create_topic(topic, partitions=1))

    def config(group: str) -> str:
        return (f'[mqtt]\nurl = "mqtt://{mqtt_broker.bootstrap}"\ntopics = ["{topic}"]\n'
                f'client_id = "{client_id}"\nreconnect_min_s = 0.1\n'
                f'[kafka]\nbootstrap = "{kafka_broker.bootstrap}"\ntopics = ["{topic}"]\n'
                f'group_id = "{group}"\ninstance_id = "{group}-a"\n'
                "session_timeout_s = 15.0\n")  # fmt: skip

    def send_mqtt(events: list[dict[str, Any]]) -> None:
        payloads = [json.dumps(e).encode() for e in events]
        assert len(payloads) == asyncio.run(
            mqtt_publish(f"mqtt://{mqtt_broker.bootstrap}", topic, payloads))  # fmt: skip

    def send_kafka(events: list[dict[str, Any]]) -> None:
        payloads = [json.dumps(e).encode() for e in events]
        assert len(payloads) == asyncio.run(kafka_publish(kafka_broker.bootstrap, topic, payloads))

    def forget(eid: str, user: str) -> dict[str, Any]:
        return {"id": eid, "type": "forget", "user": user, "ts": NOW - 30}

    group = unique_name("group")
    daemon = start(config(group))
    wait_until(lambda: feed_connected(daemon, "mqtt"), bool)
    dave_history = [event(f"dave-evt-{n}", "click", dave, "shoe-1") for n in range(5)]
    erin_history = [event(f"erin-evt-{n}", "click", erin, "hat-1") for n in range(5)]
    send_mqtt(dave_history)
    send_kafka(erin_history)
    with daemon.client() as client:
        client.request("ingest", events=[event("keep-1", "view", BOB, "hat-1")])
    for user in (dave, erin):
        wait_until(lambda u=user: user_view(daemon, u), lambda v: v and len(v["recent"]) == 5)
    send_mqtt([forget("forget-dave", dave)])
    send_kafka([forget("forget-erin", erin)])
    for user in (dave, erin):
        wait_until(lambda u=user: user_view(daemon, u), lambda v: v is None)
    # a replay: each feed delivers the user's whole history again, and a newer event,
    # then a sentinel of another user (what comes after it on the feed is in the log)
    send_mqtt([*dave_history, event("dave-late", "click", dave, "shoe-2"),
               event("bob-late-m", "view", BOB, "shoe-2")])  # fmt: skip
    send_kafka([*erin_history, event("erin-late", "click", erin, "shoe-2"),
                event("bob-late-k", "view", BOB, "shoe-2")])  # fmt: skip
    sentinels = "SELECT count(*) FROM events WHERE id IN ('bob-late-m', 'bob-late-k')"
    wait_until(lambda: query(daemon, sentinels)[0][0], lambda n: n == 2)
    assert 0 == daemon.stop()

    replay = start(config(group))  # and a restart: the state rebuilt from what is stored
    views = (user_view(replay, dave), user_view(replay, erin))
    assert 0 == replay.stop()

    pseudos = [pseudonym(replay, u) for u in (dave, erin)]
    rows = query(replay, "SELECT count(*) FROM events WHERE user IN (?, ?)", *pseudos)[0][0]
    assert (None, None) == views
    assert 0 == rows
    needles = [*(p.encode() for p in pseudos), dave.encode(), erin.encode(), b"dave-evt-",
               b"erin-evt-", b"dave-late", b"erin-late"]  # fmt: skip
    assert {} == files_holding(replay.tmp, needles)
