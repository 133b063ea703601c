"""
The victim of ``test_crash.py``: a Kafka-consumer-like writer that is SIGKILLed.

It resumes from the feed position stored in the log, appends batches of random size
(1..200 new events, some re-delivered duplicates) with the position each batch
covers, and reports what it does on stdout, one flushed line each:

``LOADED``                      imports done; with ``--wait`` it then waits for a line on stdin
``READY <position> <offset>``   the store is open and restored
``START <batch> <new> <dup> <position>``   about to append: ``<new>`` fresh events with ids
                                ``<batch>-e0`` .. ``<batch>-e<new-1>`` covering Kafka offsets
                                ``<position>`` .. ``<position>+<new>-1``, plus ``<dup>``
                                events already in the log or repeated inside the batch
``ACK <batch> <accepted> <duplicates> <position>``   append returned: the batch is durable
``SNAP`` / ``SNAPPED``          around an explicit ``Store.snapshot()``
``TORN``                        with ``--hold-in-tmp``: the snapshot's temporary file is
                                written in full (``full``) or half (``half``) and not yet
                                renamed; the writer then sleeps until it is killed
``ERROR <text>``                the append result was not what the batch implies

Every new event carries its Kafka offset as ``ko`` (in ``context``, or in ``fields``
for item events), so the test can check the stored position against the events
present. The batch contents follow from ``--seed``; the stored position decides the
Kafka offsets. It never stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import eventstore
from eventstore import snapshots

FEED = ("kafka:t", "0")
TYPES = ("view", "view", "view", "click", "click", "cart", "purchase", "rating", "like",
         "dislike", "skip")


def new_event(rng: random.Random, event_id: str, ko: int, *, users: int, items: int) -> dict:
    """One realistic event at Kafka offset ``ko``; times mostly increase, some arrive late."""
    ts = 1_700_000_000.0 + ko * 0.5 + rng.uniform(-600.0, 5.0)
    roll = rng.random()
    if roll < 0.05:
        fields = {"ko": ko, "price": round(rng.uniform(1, 100), 2)}
        if rng.random() < 0.8:
            fields["category"] = f"c{rng.randrange(12)}"
        return {"id": event_id, "type": "item", "item": f"i{rng.randrange(items)}", "ts": ts,
                "fields": fields}
    user = f"u{rng.randrange(users)}"
    if roll < 0.12:
        shown = [f"i{rng.randrange(items)}" for _ in range(rng.randint(1, 8))]
        return {"id": event_id, "type": "impression", "user": user, "items": shown, "ts": ts,
                "ranking_id": f"r{ko}", "context": {"ko": ko, "page": "home"}}
    kind = rng.choice(TYPES)
    event = {"id": event_id, "type": kind, "user": user, "item": f"i{rng.randrange(items)}",
             "ts": ts, "context": {"ko": ko}}
    if kind == "rating":
        event["value"] = float(rng.randint(1, 5))
    elif kind == "view" and rng.random() < 0.5:
        event["value"] = round(rng.uniform(0.5, 60.0), 1)
    return event


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--fold", required=True, help="FoldConfig keyword arguments as JSON")
    parser.add_argument("--snapshot-every", type=int, default=300)
    parser.add_argument("--snapshot-prob", type=float, default=0.05,
                        help="chance of an explicit Store.snapshot() after each batch")
    parser.add_argument("--dup-prob", type=float, default=0.2,
                        help="chance that a batch also carries re-delivered events")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--wait", action="store_true", help="wait for a stdin line after LOADED")
    parser.add_argument("--hold-in-tmp", choices=("full", "half"),
                        help="stop inside the first snapshot write, its temp file on disk")
    return parser.parse_args()


def say(line: str) -> None:
    """One protocol line, written and flushed in one piece."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def hold_in_tmp(mode: str) -> None:
    """Make the next snapshot write stop with its temporary file on disk, fully or half written.

    So that every run of the test has kills that leave a torn temporary file, which a kill
    at a random moment rarely does (the file exists for a few milliseconds).
    """
    def write_and_hold(fd: int, data: bytes) -> None:
        os.write(fd, data if mode == "full" else data[: len(data) // 2])
        os.fsync(fd)
        say("TORN")
        time.sleep(600)

    snapshots._write_all = write_and_hold  # noqa: SLF001 - test instrumentation


def main() -> None:
    args = parse_args()
    if args.hold_in_tmp:
        hold_in_tmp(args.hold_in_tmp)
    say("LOADED")
    if args.wait:
        sys.stdin.readline()
    rng = random.Random(args.seed)  # noqa: S311 - test data, reproducible by seed
    store = eventstore.Store(args.directory, fold=eventstore.FoldConfig(**json.loads(args.fold)),
                             snapshot_every=args.snapshot_every)
    position = int(store.log.positions().get(FEED, 0))
    say(f"READY {position} {store.state.offset}")
    # events already durable, to re-deliver: the log's tail, then what this run appends
    pool = [event for _, event in store.log.read(after=max(store.state.offset - 400, 0))]
    for b in range(1_000_000):
        batch = f"s{args.seed}-b{b}"
        n_new = rng.randint(1, 200)
        raw = json.dumps([new_event(rng, f"{batch}-e{k}", position + k, users=args.users,
                                    items=args.items)
                          for k in range(n_new)]).encode()
        decoded = store.decoder.decode(raw)
        if decoded.rejected or len(decoded.events) != n_new:
            say(f"ERROR {batch} rejected {[str(r.error) for r in decoded.rejected]}")
            sys.exit(1)
        events = list(decoded.events)
        if pool and rng.random() < args.dup_prob:
            for dup in rng.sample(pool, min(len(pool), rng.randint(1, 20))):
                events.insert(rng.randint(0, len(events)), dup)
        if rng.random() < 0.05:  # the same id again later in the same batch
            k = rng.randrange(len(events))
            events.insert(rng.randint(k + 1, len(events)), events[k])
        n_dup = len(events) - n_new
        say(f"START {batch} {n_new} {n_dup} {position}")
        result = store.append(events, positions={FEED: position + n_new})
        if (result.accepted, result.duplicates) != (n_new, n_dup):
            say(f"ERROR {batch} accepted {result.accepted} duplicates {result.duplicates}")
            sys.exit(1)
        position += n_new
        say(f"ACK {batch} {result.accepted} {result.duplicates} {position}")
        pool.extend(decoded.events)
        del pool[:-400]
        if rng.random() < args.snapshot_prob:
            say("SNAP")
            store.snapshot()
            say("SNAPPED")


if __name__ == "__main__":
    main()
