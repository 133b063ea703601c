"""
Crash loop: SIGKILL a real writer process again and again, and check the store after each kill.

The writer (``_crash_writer.py``, started with ``sys.executable``) behaves like a Kafka
consumer: it resumes from the feed position stored in the log, appends batches with
the position they cover, acknowledges each batch on stdout once ``append`` has
returned, re-delivers some events already logged, and snapshots (in some runs after
every batch, so kills land inside snapshot writing and leave torn temporary files).

After each kill, on a copy of the directory (so the next writer still recovers the
original itself), the test checks:

a. every acknowledged batch is in the log, each id once;
b. every batch the writer started is in the log entirely or not at all, and the log
   holds nothing else;
c. the stored position of ``("kafka:t", "0")`` is the next Kafka offset to consume:
   the events present carry exactly Kafka offsets ``0 .. position-1``, in log order,
   and it is never behind an acknowledged position;
d. ``Store(dir)`` (newest valid snapshot + tail replay) gives byte for byte the state
   of a fresh fold of the whole log, at the same offset.

And the next writer, recovering the original directory, resumes from the position
and offset the check found.

Schedule (seeded): 60 kills over 5 directories of 12 runs. Every third run snapshots
after every batch. The first run of each directory and about 10% of the others are
killed 0-30 ms after being let go (creating, opening, restoring); the sixth of each
directory is killed inside its first snapshot write, the temporary file on disk in full or
in half (a random kill leaves one only now and then); the rest 20-300 ms after READY.
Each writer is started two runs ahead and held before opening the store, so its ~0.5 s
of imports overlaps the checks. About 40 s on 2 cores: not marked slow.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import eventstore
from eventstore import FoldConfig, SnapshotStore, State, Store, project

WRITER = Path(__file__).with_name("_crash_writer.py")
FEED = ("kafka:t", "0")
# Small rings and few category slots, so sequences wrap and interest slots get evicted.
FOLD = {"seq_len": 20, "half_life_s": 3600.0, "categories_per_user": 4, "purchases_per_user": 4}
CONFIG = FoldConfig(**FOLD)
KILLS = 60
RUNS_PER_DIRECTORY = 12  # a fresh directory now and then keeps the per-kill fold cheap
SEED = 20261127


@dataclass
class Batch:
    """What a START line announced, and the ACK if one came."""

    new: int
    dup: int
    position: int
    ack: tuple[int, int, int] | None = None  # accepted, duplicates, position after

    def ids(self, name: str) -> set[str]:
        return {f"{name}-e{k}" for k in range(self.new)}


@dataclass
class History:
    """Everything the writers of one directory reported."""

    batches: dict[str, Batch] = field(default_factory=dict)
    acked_position: int = 0
    checked: tuple[int, int] = (0, 0)  # position and state offset the last check found


@dataclass
class Tally:
    """How the kills landed, so the test can refuse to pass vacuously."""

    kills: int = 0
    mid_batch: int = 0          # last batch STARTed without ACK
    in_snapshot: int = 0        # SNAP without SNAPPED
    torn_tmp: int = 0           # kills that left a snapshot temp file behind
    partial_tmp: int = 0        # ... that does not even verify (killed mid-write)
    early: int = 0              # killed 0-30 ms after GO, while opening, creating, restoring
    before_ready: int = 0       # ... of which before the store was open
    snapshot_and_tail: int = 0  # restores that used a snapshot and replayed a tail
    events: int = 0


class Writer:
    """One writer process, started ahead of time and held at ``LOADED`` until :meth:`go`."""

    def __init__(self, directory: Path, seed: int, *, snapshots: bool, hold: str | None,
                 errors: IO[bytes]) -> None:
        self.seed = seed
        args = [sys.executable, str(WRITER), str(directory), "--seed", str(seed),
                "--fold", json.dumps(FOLD), "--wait"]
        if snapshots:  # snapshot after every batch: many kills inside snapshot writing
            args += ["--snapshot-prob", "1.0", "--snapshot-every", "100000", "--users", "1000"]
        if hold:  # stop inside the first snapshot write, its temporary file on disk
            args += ["--hold-in-tmp", hold]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=errors)
        self.lines: list[str] = []

    def wait_for(self, word: str) -> None:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            assert line, f"writer {self.seed} exited early ({self.proc.wait()}) before {word}"
            self.lines.append(line.decode())
            if line.startswith(word.encode()):
                return

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"GO\n")
        self.proc.stdin.flush()

    def discard(self) -> None:
        """Kill it without looking (a run that did not get to it, or after a failure)."""
        self.proc.kill()
        self._close()

    def _close(self) -> None:
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def kill(self) -> list[list[str]]:
        """SIGKILL it; return the complete protocol lines it wrote, split into words."""
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.stdout is not None
        # stdout.read(), not communicate(): that reads the pipe's fd directly and would
        # miss what readline() has already buffered
        rest = self.proc.stdout.read()
        self._close()
        text = "".join(self.lines) + rest.decode(errors="replace")
        assert self.proc.returncode == -signal.SIGKILL, (
            f"writer {self.seed} ended by itself with {self.proc.returncode}: {text[-2000:]}")
        complete = text.split("\n")[:-1]  # a line cut by the kill has no newline
        return [line.split() for line in complete if line[:4] in {"LOAD", "READ", "STAR", "ACK ",
                                                                  "SNAP", "ERRO"}]


def _ko(event: eventstore.Event) -> int:
    extra = getattr(event, "context", None) or getattr(event, "fields", None)
    return extra["ko"]


def _partial(tmp: Path) -> bool:
    try:
        SnapshotStore(tmp.parent).load(tmp, CONFIG)
    except (eventstore.CorruptSnapshotError, OSError):
        return True
    return False


def _record(words: list[list[str]], history: History, tally: Tally) -> None:
    """Fold one run's protocol lines into the history and the tally."""
    open_batch = None
    in_snapshot = False
    for w in words:
        assert w[0] != "ERROR", " ".join(w)
        if w[0] == "READY":  # the writer recovered the original as the check did the copy
            assert history.checked == (int(w[1]), int(w[2]))
        elif w[0] == "START":
            assert w[1] not in history.batches, f"batch id {w[1]} reused"
            history.batches[w[1]] = Batch(int(w[2]), int(w[3]), int(w[4]))
            open_batch = w[1]
        elif w[0] == "ACK":
            batch = history.batches[w[1]]
            batch.ack = (int(w[2]), int(w[3]), int(w[4]))
            assert (batch.new, batch.dup) == batch.ack[:2]
            history.acked_position = batch.ack[2]
            open_batch = None
        elif w[0] == "SNAP":
            in_snapshot = True
        elif w[0] == "SNAPPED":
            in_snapshot = False
    tally.kills += 1
    tally.mid_batch += open_batch is not None
    tally.in_snapshot += in_snapshot
    tally.before_ready += not any(w[0] == "READY" for w in words)


def _check(directory: Path, history: History, tally: Tally) -> None:
    """Checks a-d on ``directory`` (a copy: opening it recovers the WAL and checkpoints)."""
    store = Store(directory, fold=CONFIG, snapshot_every=0)
    try:
        rows = list(store.log.read())
        ids = [event.id for _, event in rows]
        present = set(ids)
        # a. and b.
        assert len(ids) == len(present) == store.log.count()
        expected: set[str] = set()
        for name, batch in history.batches.items():
            mine = batch.ids(name)
            found = len(mine & present)
            if batch.ack is not None:
                assert (name, batch.new) == (name, found)
            else:
                assert found in {0, batch.new}, f"{name}: {found} of {batch.new} events present"
            expected |= mine
        assert set() == present - expected
        # c.
        position = store.log.positions().get(FEED, 0)
        assert list(range(position)) == [_ko(event) for _, event in rows]
        assert position >= history.acked_position
        if rows:
            covered = store.log.db.execute(
                "SELECT log_offset FROM feed_positions WHERE feed = ? AND partition = ?",
                FEED).fetchone()[0]
            assert covered >= rows[-1][0]
        # d.
        fresh = project(State(CONFIG), (event for _, event in rows))
        fresh.offset = rows[-1][0] if rows else 0
        assert fresh.offset == store.state.offset
        assert fresh.to_bytes() == store.state.to_bytes()
        snap = SnapshotStore(directory / "snapshots").newest_valid(CONFIG)
        tally.snapshot_and_tail += snap is not None and 0 < snap.offset < fresh.offset
        tally.events = len(rows)
        history.checked = (position, fresh.offset)
    finally:
        store.close(snapshot=False)


@dataclass(frozen=True)
class Run:
    """One writer of the schedule."""

    directory: Path
    snapshots: bool     # snapshot after every batch
    early: bool         # killed 0-30 ms after GO
    hold: str | None    # killed once the snapshot temp file is on disk, "full" or "half"


def _plan(tmp_path: Path, rng: random.Random) -> list[Run]:
    """The seeded schedule; the sixth run of each directory is killed with a torn temp file."""
    plan = []
    for run in range(KILLS):
        directory = run // RUNS_PER_DIRECTORY
        first = run % RUNS_PER_DIRECTORY == 0  # a new directory: kill it while creating
        torn = run % RUNS_PER_DIRECTORY == 5
        plan.append(Run(tmp_path / f"store{directory}", snapshots=run % 3 == 2 or torn,
                        early=not torn and (first or rng.random() < 0.1),
                        hold=("half" if directory % 2 else "full") if torn else None))
    return plan


def _crash_loop(tmp_path: Path, errors: IO[bytes]) -> Tally:
    """Start, kill and check KILLS writers; each is started two runs ahead (imports are slow)."""
    rng = random.Random(SEED)  # noqa: S311 - reproducible test schedule
    plan = _plan(tmp_path, rng)
    tally = Tally()
    histories: dict[Path, History] = {}

    def start(run: int) -> Writer:
        return Writer(plan[run].directory, SEED + run, snapshots=plan[run].snapshots,
                      hold=plan[run].hold, errors=errors)

    ahead: deque[Writer] = deque(start(run) for run in range(2))
    try:
        for run, step in enumerate(plan):
            directory = step.directory
            writer = ahead[0]
            if run + 2 < KILLS:
                ahead.append(start(run + 2))
            writer.wait_for("LOADED")
            writer.go()
            if step.hold:
                writer.wait_for("TORN")
            elif step.early:
                time.sleep(rng.uniform(0.0, 0.03))
            else:
                writer.wait_for("READY")
                time.sleep(rng.uniform(0.02, 0.3))
            words = writer.kill()
            ahead.popleft()
            _record(words, histories.setdefault(directory, History()), tally)
            tally.early += step.early
            tmps = list((directory / "snapshots").glob(".snapshot-*.tmp"))
            tally.torn_tmp += bool(tmps)
            tally.partial_tmp += any(_partial(tmp) for tmp in tmps)
            copy = tmp_path / "check"
            shutil.rmtree(copy, ignore_errors=True)
            if directory.exists():
                shutil.copytree(directory, copy)
                _check(copy, histories[directory], tally)
    finally:
        for writer in ahead:
            writer.discard()
    return tally


def test_sigkill_keeps_acknowledged_batches_atomic_positions_and_exact_restore(tmp_path):
    """After each of 60 SIGKILLs of a writer, the log and the restored state are consistent."""
    started = time.monotonic()
    with (tmp_path / "writer-stderr").open("w+b") as errors:
        try:
            tally = _crash_loop(tmp_path, errors)
        finally:
            errors.seek(0)
            stderr = errors.read().decode(errors="replace")
            assert "Traceback" not in stderr, stderr
    print(f"\n{tally} in {time.monotonic() - started:.1f} s")  # noqa: T201 - shown with pytest -s
    assert tally.kills >= 50
    assert tally.mid_batch >= 5, tally
    assert tally.in_snapshot >= 1, tally
    assert tally.torn_tmp >= KILLS // RUNS_PER_DIRECTORY, tally
    assert tally.partial_tmp >= KILLS // RUNS_PER_DIRECTORY // 2, tally
    assert tally.snapshot_and_tail >= 5, tally
    assert tally.early >= 5, tally
