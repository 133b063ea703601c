"""
Load public datasets into the log as events.

Two formats:

``sasrec``
    One interaction per line, ``user item`` (integers), each user's lines in time
    order, no timestamps (the SASRec authors' preprocessing). Event ``k`` of a user
    gets ``ts = base_ts + k * step_s``: every user's history is laid out on the same
    clock, one step apart, which keeps each user's order (the only order the file
    knows) and lets decayed popularity see the whole catalogue evenly.

``movielens``
    MovieLens 100K (``u.data`` tab-separated, ``u.item`` ``|``-separated Latin-1) or
    1M (``ratings.dat`` / ``movies.dat``, ``::``-separated). A directory, or the
    ratings file itself with the item file beside it. Items become ``item`` events
    (title, genres as ``tags``, the first genre as ``category``, release date as
    ``created_at``); ratings become ``rating`` events in time order. MovieLens 100K
    dates from 1997–98, before the 2000 lower bound of the event format, so event
    times are shifted by whole weeks (keeping weekdays and times of day) until the
    first lands in 2000; the shift is reported.

Event ids are ``<dataset>:<line>``, so importing the same file twice is a no-op
(every event a duplicate).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

from tqdm import tqdm

from eventstore.schema import (
    EVENT_CLASSES,
    INTERACTION_TYPES,
    MIN_TS,
    Event,
    ItemUpdated,
    Rated,
)
from eventstore.store import Store

__all__ = ["FORMATS", "ImportReport", "import_dataset", "movielens_events", "sasrec_events"]

Format = Literal["sasrec", "movielens"]
FORMATS: Final = ("sasrec", "movielens")
SASREC_BASE_TS: Final = 1_704_067_200.0  # 2024-01-01T00:00:00Z
_WEEK: Final = 7 * 86_400
_ML100K_GENRES: Final = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What an import did."""

    read: int
    accepted: int
    duplicates: int
    time_shift_s: float
    seconds: float


def sasrec_events(path: str | Path, *, event_type: str = "view",
                  base_ts: float = SASREC_BASE_TS, step_s: float = 3600.0) -> Iterator[Event]:
    """
    Events of a SASRec-format file (``user item`` per line).

    Raises:
        ValueError: a line is not two integers (the message names the line).
    """
    if event_type not in INTERACTION_TYPES or event_type == "rating":
        msg = f"type: expected one of {', '.join(t for t in INTERACTION_TYPES if t != 'rating')}"
        raise ValueError(msg)
    cls = EVENT_CLASSES[event_type]
    path = Path(path)
    prefix = path.stem
    position: dict[str, int] = {}
    with path.open(encoding="utf-8") as lines:
        for n, line in enumerate(lines, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                msg = f"{path}:{n}: expected 'user item' (two integers)"
                raise ValueError(msg)
            user, item = parts
            k = position.get(user, 0)
            position[user] = k + 1
            yield cls(id=f"{prefix}:{n}", ts=base_ts + k * step_s, user=user, item=item)


def _ml_files(path: Path) -> tuple[Path, Path | None, str]:
    """(ratings file, item file or None, separator)."""
    if path.is_dir():
        for ratings, items, sep in (("u.data", "u.item", "\t"), ("ratings.dat", "movies.dat", "::")):
            if (path / ratings).exists():
                item_file = path / items
                return path / ratings, item_file if item_file.exists() else None, sep
        msg = f"{path}: no u.data or ratings.dat in this directory"
        raise ValueError(msg)
    if path.name == "ratings.dat" or "::" in path.open(encoding="latin-1").readline():
        other = path.with_name("movies.dat")
        return path, other if other.exists() else None, "::"
    other = path.with_name("u.item")
    return path, other if other.exists() else None, "\t"


def _ml_items(path: Path, *, genres: tuple[str, ...]) -> Iterator[ItemUpdated]:
    """Item events; release dates are catalogue facts and are not shifted."""
    prefix = path.parent.name or path.stem
    with path.open(encoding="latin-1") as lines:
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if path.name == "movies.dat":
                item, title, tags = line.rstrip("\n").split("::")
                names = [g for g in tags.split("|") if g]
                created = None
            else:
                cols = line.rstrip("\n").split("|")
                item, title, released = cols[0], cols[1], cols[2]
                names = [genres[k] for k, flag in enumerate(cols[5:]) if flag == "1" and k < len(genres)]
                created = _parse_ml_date(released)
            fields: dict[str, object] = {"title": title, "tags": names}
            if names:
                fields["category"] = names[0]
            if created is not None:
                fields["created_at"] = created
            yield ItemUpdated(id=f"{prefix}:item:{n}", ts=MIN_TS, item=item, fields=fields)


def _parse_ml_date(text: str) -> float | None:
    try:
        return datetime.strptime(text, "%d-%b-%Y").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def movielens_events(path: str | Path) -> tuple[list[Event], float]:
    """
    Item events then rating events in time order, and the time shift applied.

    Raises:
        ValueError: the files are missing or a line is malformed (named by line).
    """
    ratings_file, items_file, sep = _ml_files(Path(path))
    prefix = ratings_file.parent.name or ratings_file.stem
    rows: list[tuple[int, int, str, str, float]] = []
    with ratings_file.open(encoding="latin-1") as lines:
        for n, line in enumerate(lines, start=1):
            parts = line.strip().split(sep)
            if len(parts) != 4:
                if not line.strip():
                    continue
                msg = f"{ratings_file}:{n}: expected user{sep}item{sep}rating{sep}timestamp"
                raise ValueError(msg)
            user, item, rating, ts = parts
            rows.append((int(ts), n, user, item, float(rating)))
    rows.sort()
    first = rows[0][0] if rows else MIN_TS
    shift = math.ceil((MIN_TS - first) / _WEEK) * _WEEK if first < MIN_TS else 0.0
    genres = _ML100K_GENRES
    genre_file = ratings_file.with_name("u.genre")
    if genre_file.exists():
        genres = tuple(g.split("|")[0] for g in genre_file.read_text("latin-1").splitlines() if g)
    events: list[Event] = []
    if items_file is not None:
        events.extend(_ml_items(items_file, genres=genres))
    events.extend(Rated(id=f"{prefix}:{n}", ts=ts + shift, user=user, item=item, value=value)
                  for ts, n, user, item, value in rows)
    return events, float(shift)


def import_dataset(store: Store, path: str | Path, *, fmt: Format, batch: int = 5_000,
                   event_type: str = "view", progress: bool = True,
                   clock: Callable[[], float] | None = None,
                   transform: Callable[[list[Event]], list[Event]] | None = None) -> ImportReport:
    """
    Append a dataset's events to ``store`` durably, in batches, with a progress bar.

    ``transform``, when given, turns each batch into what is appended (the daemon's
    privacy plugins: pseudonymized user ids); ``accepted`` and ``duplicates`` count
    what it returned.

    Raises:
        ValueError: unknown format, or a malformed file (the message names the line).
    """
    now = clock or time.perf_counter
    started = now()
    shift = 0.0
    events: Iterable[Event]
    if fmt == "sasrec":
        with Path(path).open(encoding="utf-8") as f:
            total = sum(1 for line in f if line.strip())
        events = sasrec_events(path, event_type=event_type)
    elif fmt == "movielens":
        events, shift = movielens_events(path)
        total = len(events)
    else:
        msg = f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}"
        raise ValueError(msg)
    read = accepted = duplicates = 0
    pending: list[Event] = []
    bar = tqdm(total=total, unit="ev", desc=f"import {Path(path).name}", disable=not progress,
               unit_scale=True, leave=False)
    with bar:
        for event in events:
            pending.append(event)
            if len(pending) >= batch:
                a, d = _flush(store, transform(pending) if transform else pending)
                accepted, duplicates, read = accepted + a, duplicates + d, read + len(pending)
                bar.update(len(pending))
                pending = []
        if pending:
            a, d = _flush(store, transform(pending) if transform else pending)
            accepted, duplicates, read = accepted + a, duplicates + d, read + len(pending)
            bar.update(len(pending))
    return ImportReport(read, accepted, duplicates, shift, now() - started)


def _flush(store: Store, events: list[Event]) -> tuple[int, int]:
    result = store.append(events)
    return result.accepted, result.duplicates

