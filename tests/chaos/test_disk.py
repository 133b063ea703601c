"""
Disk faults under a real `rerankd run` with both feeds: the data directory fills up,
or turns read-only, and comes back.

Each test runs one daemon (tests/daemons.py) whose ``[store].data_dir`` is a tmpfs of
its own (``mount -t tmpfs -o size=...``, unmounted in teardown), fed by the socket, the
real Kafka and the real Mosquitto at once. A cycle is: the fault begins; the socket
ingests until the daemon answers ``storage_unavailable``; events are published to both
brokers meanwhile; both feeds must pause (the MQTT messages unacknowledged, no Kafka
offset committed past what the log holds), rank must keep answering from memory, the
daemon must stay up and the snapshots stay intact; then the fault ends, and ingest must
resume by itself within ``RESUME_S`` and the feeds deliver what they held. At the end,
every event ever acknowledged (an ``ok`` answer, or a broker's acknowledgement of a
publish) is in the log exactly once, the daemon stops cleanly, and its state (the
snapshot written at the stop) equals a fresh fold of the log, byte for byte.

The faults:

- **full**: a filler file takes all but ``LEAVE_BYTES`` of the tmpfs, and the socket's
  own ingest takes the rest (SQLITE_FULL; snapshots fail for lack of space too).
  Deleting the filler gives the space back.
- **read-only**: ``mount -o remount,ro`` cannot do it: Linux refuses to remount a file
  system read-only while a process holds a file on it open for writing (EBUSY), and
  the daemon always holds its log so. (A file system that turns read-only by itself,
  ext4's ``errors=remount-ro``, cannot be made writable again without unmounting it.)
  So the test makes it read-only *for the daemon*: strace attaches to it and fails
  every write, fsync, truncate, rename and unlink on the log's files with EROFS, which
  is what a read-only file system answers on descriptors opened before it turned so;
  detaching strace makes it writable again. Needs ``strace`` (scripts/test installs it).

A third test stops the daemon while the disk is full (exit 0, its last snapshot
skipped) and starts it again once there is space: nothing acknowledged is missing.

They need root (mount, ptrace), as CI has. Default: one cycle per fault; ``--long``:
``LONG_CYCLES`` each, every fault held ``LONG_HOLD_S`` while rank and ingest go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from brokers import KafkaBroker, MqttBroker, unique_name
from daemons import Daemon, poll

from daemon.client import RequestFailedError
from daemon.config import load_config
from daemon.feeds import kafka, mqtt
from eventstore import EventLog, SnapshotStore, State, project

pytestmark = [pytest.mark.chaos, pytest.mark.brokers]

TMPFS_BYTES = 24 << 20
#: What the filler leaves free: room for a small append, not for a snapshot (~300 KiB).
LEAVE_BYTES = 128 << 10
#: Bound on ingest resuming by itself once the fault is gone (the probe backs off to 2 s).
RESUME_S = 20.0
#: Bound on the other waits (feeds catching up, pausing, a fill); far above what they need.
WAIT_S = 60.0
LONG_CYCLES = 4
#: Under --long each fault also holds this long, ranked and published into meanwhile.
LONG_HOLD_S = 20.0
USERS = 400  # enough users that a snapshot is larger than LEAVE_BYTES
PAD = "x" * 1500  # makes the filling events large, so the fill takes few batches
NOW = time.time()
#: Frequent snapshots, so that some meet the full disk.
STORE = "snapshot_every_events = 150\nsnapshot_interval_s = 1.0\n"


# --------------------------------------------------------------------------- set-up


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.fail(f"tests/chaos/test_disk.py needs root to {what} (CI runs as root)")


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of ``size_bytes`` mounted on ``path``; unmounted afterwards, whatever happened."""
    require_root("mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs",
                    str(path)], check=True, capture_output=True)  # fmt: skip
    try:
        yield path
    finally:
        for _ in range(50):
            done = subprocess.run(["umount", str(path)], check=False, capture_output=True)
            if done.returncode == 0:
                break
            time.sleep(0.1)  # a process that had it open is still exiting
        else:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


class Fault(Protocol):
    name: str
    refusal: str  # what the storage_unavailable message must say

    def begin(self, run: Run) -> None: ...
    def end(self) -> None: ...


class FullDisk:
    """A filler file takes all the space but ``LEAVE_BYTES``; deleting it gives it back."""

    name = "full"
    refusal = "disk full"

    def __init__(self, data: Path) -> None:
        self.filler = data / "filler"

    def begin(self, run: Run) -> None:
        """
        Fill all but ``LEAVE_BYTES``, then append one event after the snapshot interval
        (1 s): it commits, and the snapshot it triggers meets the full disk.
        """
        st = os.statvfs(self.filler.parent)
        size = max(0, st.f_bavail * st.f_frsize - LEAVE_BYTES)
        chunk = b"\0" * (1 << 20)
        with self.filler.open("wb") as f:
            while size > 0:
                size -= f.write(chunk[: min(size, len(chunk))])
        time.sleep(1.2)
        assert run.ingest([event(k, run.sent) for k in run.keys("s", 1)])["ok"]

    def end(self) -> None:
        self.filler.unlink()


#: The system calls that write, on the log's files: what fails on a read-only file system.
_WRITES = ("write,pwrite64,writev,pwritev,pwritev2,ftruncate,fallocate,fsync,fdatasync,"
           "rename,renameat,renameat2,unlink,unlinkat")


class ReadOnly:
    """strace, attached to the daemon, fails its writes to the log's files with EROFS."""

    name = "read-only"
    refusal = "read-only"

    def __init__(self, daemon: Daemon, data: Path) -> None:
        require_root("attach strace to the daemon")
        if shutil.which("strace") is None:
            pytest.fail("tests/chaos/test_disk.py needs strace (scripts/test installs it)")
        self.pid = daemon.proc.pid
        self.paths = [data / name for name in
                      ("events.db", "events.db-wal", "events.db-shm", "events.db-journal")]
        self.out = daemon.tmp / "strace.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def begin(self, run: Run) -> None:  # noqa: ARG002 - the Fault protocol
        command = ["strace", "-qq", "-f", "-p", str(self.pid), "-o", str(self.out),
                   "-e", f"trace={_WRITES}", "-e", f"inject={_WRITES}:error=EROFS"]
        for path in self.paths:
            command += ["-P", str(path)]
        errors = self.out.with_suffix(".err")
        with errors.open("wb") as stderr:  # a file, not a pipe: a full pipe would stall it
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        tracer = str(self.proc.pid)
        attached = poll(self._tracers, lambda t: t == {tracer} or self.proc.poll() is not None,
                        WAIT_S)  # fmt: skip
        if self.proc.poll() is not None:
            pytest.fail(f"strace could not attach to the daemon: {errors.read_text().strip()}")
        assert {tracer} == attached, "strace did not attach to every thread of the daemon"

    def _tracers(self) -> set[str]:
        """The TracerPid of each of the daemon's threads."""
        found = set()
        for status in Path(f"/proc/{self.pid}/task").glob("*/status"):
            with contextlib.suppress(OSError):
                text = status.read_text()
                found.add(re.search(r"TracerPid:\s*(\d+)", text).group(1))  # type: ignore[union-attr]
        return found

    def end(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # strace detaches, the daemon runs on
            self.proc.wait(timeout=30)
        self.proc = None
        assert {"0"} == poll(self._tracers, lambda t: t == {"0"}, WAIT_S)


# ------------------------------------------------------------------------- events


def event(key: str, n: int, kind: str = "click", *, item: str | None = None,
          pad: bool = False) -> dict[str, Any]:  # fmt: skip
    obj: dict[str, Any] = {"id": key, "type": kind, "user": f"person-{n % USERS}",
                           "item": item or f"i-{n % 40}", "ts": NOW - 60 + n * 1e-3}  # fmt: skip
    if pad:
        obj["context"] = {"page": PAD}
    return obj


def payload(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


@dataclass
class Run:
    """One daemon, its topic and client id, and what was acknowledged to whom."""

    daemon: Daemon
    data: Path
    kafka: KafkaBroker
    mqtt: MqttBroker
    topic: str
    group: str
    config: str  # the daemon's config, less [store] and [server]
    acked: list[str] = field(default_factory=list)  # ok answers and broker acks, in order
    answers: dict[str, int] = field(default_factory=dict)  # error code -> count
    sent: int = 0
    via_mqtt: int = 0  # messages published to Mosquitto so far

    def keys(self, prefix: str, n: int) -> list[str]:
        start, self.sent = self.sent, self.sent + n
        return [f"{prefix}-{k}" for k in range(start, start + n)]

    # the socket

    def ingest(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        """The daemon's answer (ok or error); ids of an ok answer count as acknowledged."""
        with self.daemon.client() as client:
            try:
                answer = client.request("ingest", events=events)
            except RequestFailedError as error:
                self.answers[error.code] = self.answers.get(error.code, 0) + 1
                return error.response
        self.answers["ok"] = self.answers.get("ok", 0) + 1
        assert 0 == len(answer["rejected"]), answer
        self.acked += [e["id"] for e in events]
        return answer

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        with self.daemon.client() as client:
            return client.request(op, **fields)

    def stats(self) -> dict[str, Any]:
        return self.request("stats")

    def rank_top(self) -> str:
        """The first of three candidates, of which only "hot" has events (60 purchases)."""
        ranked = self.request("rank", user="person-1", candidates=["cold-a", "hot", "cold-b"])
        return str(ranked["items"][0])

    # the brokers

    def publish(self, n: int) -> tuple[list[str], list[str]]:
        """``n`` events to each broker; each acknowledged by its broker (so: must not be lost)."""
        via_kafka, via_mqtt = self.keys("k", n), self.keys("m", n)
        sent_k = asyncio.run(kafka.publish(self.kafka.bootstrap, self.topic,
                                           [payload(event(k, i)) for i, k in enumerate(via_kafka)]))
        sent_m = asyncio.run(mqtt.publish(f"mqtt://{self.mqtt.bootstrap}", self.topic,
                                          [payload(event(k, i)) for i, k in enumerate(via_mqtt)]))
        assert (n, n) == (sent_k, sent_m)
        self.acked += via_kafka + via_mqtt
        self.via_mqtt += n
        return via_kafka, via_mqtt

    def committed(self) -> dict[int, int]:
        """The group's offsets committed in Kafka, by partition."""

        async def read() -> dict[int, int]:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka.bootstrap)
            await admin.start()
            try:
                offsets = await admin.list_consumer_group_offsets(self.group)
            finally:
                await admin.close()
            return {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}

        return asyncio.run(read())

    # the log, read-only from outside

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        uri = f"file:{self.data / 'events.db'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
            return db.execute(sql, args).fetchall()

    def logged(self) -> list[str]:
        return [row[0] for row in self.query("SELECT id FROM events")]

    def stored_offsets(self) -> dict[int, int]:
        rows = self.query("SELECT partition, position FROM feed_positions WHERE feed = ?",
                          f"kafka:{self.topic}")
        return {int(p): int(o) for p, o in rows}

    def wait_logged(self, keys: list[str], what: str) -> None:
        want = set(keys)
        logged = poll(lambda: set(self.logged()), lambda got: want <= got, WAIT_S)
        missing = want - logged
        example = sorted(missing)[:3]
        assert not missing, f"{what}: {len(missing)} of {len(want)} not in the log: {example}"


# ---------------------------------------------------------------------- fixtures


def daemon_config(kafka_broker: KafkaBroker, mqtt_broker: MqttBroker, topic: str,
                  group: str) -> str:  # fmt: skip
    return (
        "[ranking]\ntrain_on_start = false\n"
        f'[kafka]\nbootstrap = "{kafka_broker.bootstrap}"\ntopics = ["{topic}"]\n'
        f'group_id = "{group}"\ninstance_id = "{group}-a"\nsession_timeout_s = 15.0\n'
        f'[mqtt]\nurl = "mqtt://{mqtt_broker.bootstrap}"\ntopics = ["{topic}"]\n'
        f'client_id = "{group}"\nreconnect_min_s = 0.1\nreconnect_max_s = 1.0\n'
    )


@pytest.fixture(name="run")
def fixture_run(tmp_path: Path, kafka_broker: KafkaBroker, mqtt_broker: MqttBroker,
                ) -> Iterator[Run]:  # fmt: skip
    """A daemon on a tmpfs, both feeds connected, a base of events in its log."""
    topic, group = unique_name("disk"), unique_name("disk")
    asyncio.run(kafka_broker.create_topic(topic, partitions=2))
    with tmpfs(tmp_path / "data", TMPFS_BYTES) as data:
        config = daemon_config(kafka_broker, mqtt_broker, topic, group)
        daemon = Daemon(tmp_path, config, store=STORE)
        try:
            daemon.wait_for("READY=1")
            run = Run(daemon, data, kafka_broker, mqtt_broker, topic, group, config)
            feeds = poll(lambda: run.stats()["feeds"],
                         lambda f: f["mqtt"]["connected"] and f["kafka"]["partitions"] == 2,
                         WAIT_S)  # fmt: skip
            assert (True, 2) == (feeds["mqtt"]["connected"], feeds["kafka"]["partitions"])
            base = [event(k, i, "purchase", item="hot") for i, k in enumerate(run.keys("s", 60))]
            base += [event(k, i) for i, k in enumerate(run.keys("s", USERS))]  # every user
            assert 60 + USERS == run.ingest(base)["accepted"]
            run.publish(5)
            run.wait_logged(run.acked, "events before any fault")
            yield run
        finally:
            daemon.close()


# ------------------------------------------------------------------------- a cycle


def fill_until_refused(run: Run, fault: Fault) -> dict[str, Any]:
    """Ingest padded batches until the daemon refuses one; that refusal."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        batch = [event(k, run.sent + i, pad=True) for i, k in enumerate(run.keys("s", 25))]
        answer = run.ingest(batch)
        if not answer["ok"]:
            return answer
    pytest.fail(f"{fault.name}: the daemon never refused an ingest within {WAIT_S} s")


def assert_snapshots_intact(run: Run) -> None:
    """No temporary file left behind; every snapshot file verifies."""
    directory = run.data / "snapshots"
    assert [] == sorted(p.name for p in directory.glob(".*.tmp"))
    config = load_config(run.daemon.config).fold
    store = SnapshotStore(directory)
    for path in store.paths():
        store.load(path, config)  # raises CorruptSnapshotError when damaged


def outage(run: Run, fault: Fault, hold_s: float) -> None:
    """The fault holds (at least ``hold_s``): ingest refused, feeds paused, rank answering."""
    began = time.monotonic()
    refusal = fill_until_refused(run, fault)["error"]
    assert "storage_unavailable" == refusal["code"]
    assert fault.refusal in refusal["message"], refusal
    assert "nothing was stored" in refusal["message"]
    assert refusal["retry_after_ms"] > 0
    storage = run.stats()["storage"]
    assert storage["available"] is False
    assert fault.refusal in storage["problem"], storage
    # every ingest while it holds is refused, never acknowledged
    held = [[event(k, run.sent + i) for i, k in enumerate(run.keys("s", 10))] for _ in range(3)]
    codes = [run.ingest(batch).get("error", {}).get("code") for batch in held]
    assert ["storage_unavailable"] * 3 == codes
    published_before = run.via_mqtt
    assert published_before == run.stats()["feeds"]["mqtt"]["acked"]  # all acknowledged
    via_kafka, via_mqtt = run.publish(20)
    feeds = poll(lambda: run.stats()["feeds"],
                 lambda f: f["kafka"]["storage_paused"] and f["mqtt"]["storage_paused"], WAIT_S)
    assert (True, True) == (feeds["kafka"]["storage_paused"], feeds["mqtt"]["storage_paused"])
    time.sleep(1.0)  # a wrong acknowledgement would have time to happen
    feeds = run.stats()["feeds"]
    logged = set(run.logged())
    stored, committed = run.stored_offsets(), run.committed()
    # MQTT: the messages are held, none acknowledged (so the broker keeps them)
    assert published_before == feeds["mqtt"]["acked"]
    assert feeds["mqtt"]["unacked"] >= 1
    # Kafka: nothing of the outage in the log, and no offset committed beyond the log's
    assert set() == logged & set(via_kafka + via_mqtt)
    assert all(committed.get(p, 0) <= stored.get(p, 0) for p in committed), (committed, stored)
    # rank answers from memory, again and again; the daemon is up
    assert ["hot"] * 20 == [run.rank_top() for _ in range(20)]
    while time.monotonic() - began < hold_s:
        assert "hot" == run.rank_top()
        assert not run.ingest(held[0])["ok"]
        time.sleep(0.2)
    feeds = run.stats()["feeds"]
    assert (published_before, True) == (feeds["mqtt"]["acked"], feeds["kafka"]["storage_paused"])
    assert set() == set(run.logged()) & set(via_kafka + via_mqtt)
    assert run.daemon.proc.poll() is None
    assert_snapshots_intact(run)
    fault.end()
    recover(run, held)


def recover(run: Run, held: list[list[dict[str, Any]]]) -> None:
    """The fault is gone: ingest resumes by itself, the feeds deliver what they held."""
    started = time.monotonic()
    first = poll(lambda: run.ingest(held[0]), lambda a: a["ok"], RESUME_S)
    resumed_s = time.monotonic() - started
    assert first["ok"], f"ingest still refused {RESUME_S} s after the fault ended: {first}"
    for batch in held[1:]:  # what the caller had been told to retry
        assert run.ingest(batch)["ok"]
    run.wait_logged(run.acked, "acknowledged events after the fault")
    storage = run.stats()["storage"]
    assert (True, None) == (storage["available"], storage["cause"])
    assert resumed_s < RESUME_S
    assert "hot" == run.rank_top()


def finish(run: Run, cycles: int) -> None:
    """Every acknowledged event once; a clean stop; state == a fresh fold of the log."""
    stats = run.stats()
    logged = run.logged()
    acked = set(run.acked)
    counts: dict[str, int] = {}
    for key in logged:
        counts[key] = counts.get(key, 0) + 1
    assert dict.fromkeys(acked, 1) == {k: counts.get(k, 0) for k in acked}
    assert len(logged) == len(set(logged))  # impressions included: nothing twice
    assert 0 == run.answers.get("internal", 0)
    episodes = stats["storage"]["episodes"]
    assert episodes >= cycles
    assert 0 == run.daemon.stop()
    log_text = (run.daemon.tmp / "daemon.log").read_text()
    lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    unavailable = [line for line in lines if line.get("event") == "storage_unavailable"]
    assert episodes == len(unavailable)  # logged once per episode
    assert episodes == len([line for line in lines if line.get("event") == "storage_available"])
    assert "person-" not in log_text  # no user id in any log line
    failures = {"request_failed", "rank_batch_failed", "storage_probe_failed",
                "storage_listener_failed", "impressions_privacy_failed", "feed_privacy_failed"}
    assert [] == [line for line in lines if line.get("event") in failures]
    config = load_config(run.daemon.config).fold
    snapshot = SnapshotStore(run.data / "snapshots").newest_valid(config)
    assert snapshot is not None
    log = EventLog(run.data / "events.db", synchronous="NORMAL")
    try:
        fresh = State(config)
        for offsets, events in log.read_chunks():
            project(fresh, events)
            fresh.offset = offsets[-1]
    finally:
        log.close()
    assert fresh.offset == snapshot.offset
    assert fresh.to_bytes() == snapshot.to_bytes()


# --------------------------------------------------------------------------- tests


def test_a_full_disk_pauses_ingest_and_feeds_and_loses_nothing(
    run: Run, long_run: bool  # noqa: FBT001 - a fixture
) -> None:
    """
    The data directory's file system fills up (a filler file, then ingest itself):
    ingest is refused with ``storage_unavailable`` naming the full disk, both feeds
    pause without acknowledging, rank answers from memory, automatic snapshots fail
    without leaving anything half-written; once the filler is deleted everything
    resumes by itself, and every acknowledged event is in the log once, with the
    state equal to a fresh fold of the log.
    """
    cycles, hold_s = (LONG_CYCLES, LONG_HOLD_S) if long_run else (1, 0.0)
    fault = FullDisk(run.data)
    for _ in range(cycles):
        fault.begin(run)
        outage(run, fault, hold_s)
    log_text = (run.daemon.tmp / "daemon.log").read_text()
    assert '"snapshot_failed"' in log_text  # a snapshot met the full disk, and was skipped
    finish(run, cycles)


def test_a_read_only_file_system_pauses_ingest_and_feeds_and_loses_nothing(
    run: Run, long_run: bool  # noqa: FBT001 - a fixture
) -> None:
    """
    Every write to the log's files fails with EROFS (a read-only file system under
    open files): ingest is refused with ``storage_unavailable`` naming it, both feeds
    pause without acknowledging, rank answers from memory; once writes succeed again
    the daemon reopens its log by itself and resumes, and every acknowledged event is
    in the log once, with the state equal to a fresh fold of the log.
    """
    cycles, hold_s = (LONG_CYCLES, LONG_HOLD_S) if long_run else (1, 0.0)
    fault = ReadOnly(run.daemon, run.data)
    try:
        for _ in range(cycles):
            fault.begin(run)
            outage(run, fault, hold_s)
    finally:
        fault.end()
    log_text = (run.daemon.tmp / "daemon.log").read_text()
    assert "read-only" in log_text or "I/O error" in log_text  # the cause was logged
    finish(run, cycles)


def test_a_stop_on_a_full_disk_is_clean_and_the_restart_loses_nothing(run: Run) -> None:
    """
    SIGTERM while the disk is full: the daemon exits 0 (its final snapshot fails and
    is skipped, the log has every event); started again once there is space, it
    restores every acknowledged event and takes ingest at once.
    """
    fault = FullDisk(run.data)
    fault.begin(run)
    assert "storage_unavailable" == fill_until_refused(run, fault)["error"]["code"]
    stopped = run.daemon.stop()
    log_text = (run.daemon.tmp / "daemon.log").read_text()
    fault.end()
    again = Daemon(run.daemon.tmp, run.config, store=STORE)
    try:
        again.wait_for("READY=1")
        run.daemon = again
        late = [event(k, run.sent + i) for i, k in enumerate(run.keys("s", 5))]
        assert run.ingest(late)["ok"]
        logged = run.logged()
        assert 0 == again.stop()
    finally:
        again.close()
    assert 0 == stopped
    assert '"at": "close"' in log_text  # the snapshot at the stop met the full disk
    assert set(run.acked) <= set(logged)
    assert len(logged) == len(set(logged))
