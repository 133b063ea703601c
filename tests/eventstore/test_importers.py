"""Importers: SASRec and MovieLens files into the log, idempotently."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventstore import Store
from eventstore.importers import import_dataset, movielens_events, sasrec_events
from eventstore.schema import MIN_TS, ItemUpdated, Rated, Viewed

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"


@pytest.fixture(name="sasrec_file")
def fixture_sasrec_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text("1 10\n1 11\n2 10\n1 12\n2 13\n")
    return path


@pytest.fixture(name="ml_dir")
def fixture_ml_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ml-tiny"
    d.mkdir()
    (d / "u.data").write_text("1\t10\t5\t881250949\n2\t10\t1\t881250940\n1\t11\t3\t881250999\n")
    genres = "|".join(["0"] * 19)
    action = "|".join(["0", "1"] + ["0"] * 17)
    (d / "u.item").write_bytes(
        f"10|Caf\xe9 (1995)|01-Jan-1995||http://x|{action}\n11|Other (1996)|||http://y|{genres}\n"
        .encode("latin-1"))
    return d


def test_sasrec_keeps_each_users_order(sasrec_file: Path) -> None:
    """A user's k-th line is dated k steps after their first; ids name file and line."""
    events = list(sasrec_events(sasrec_file, step_s=10.0))
    assert [type(e) for e in events] == [Viewed] * 5
    user1 = [(e.item, e.ts) for e in events if e.user == "1"]
    base = user1[0][1]
    assert user1 == [("10", base), ("11", base + 10.0), ("12", base + 20.0)]
    assert [e.id for e in events] == [f"tiny:{n}" for n in range(1, 6)]


def test_sasrec_rejects_a_malformed_line(tmp_path: Path) -> None:
    """A line that is not two integers is named by file and line number."""
    path = tmp_path / "bad.txt"
    path.write_text("1 10\n1 x\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected 'user item'"):
        list(sasrec_events(path))


def test_movielens_items_first_then_ratings_in_time_order(ml_dir: Path) -> None:
    """Items become item events with title/genres; ratings follow sorted by time."""
    events, shift = movielens_events(ml_dir)
    items = [e for e in events if isinstance(e, ItemUpdated)]
    ratings = [e for e in events if isinstance(e, Rated)]
    assert [e.item for e in items] == ["10", "11"]
    assert items[0].fields["title"] == "Caf\xe9 (1995)"
    assert items[0].fields["category"] == "Action"
    assert "category" not in items[1].fields
    assert [(r.user, r.item, r.value) for r in ratings] == [("2", "10", 1.0), ("1", "10", 5.0),
                                                            ("1", "11", 3.0)]
    assert shift % (7 * 86400) == 0
    assert min(r.ts for r in ratings) >= MIN_TS
    assert ratings[1].ts - ratings[0].ts == 9.0


def test_import_is_idempotent(tmp_path: Path, ml_dir: Path) -> None:
    """Importing the same dataset twice appends nothing the second time."""
    with Store(tmp_path / "store") as store:
        first = import_dataset(store, ml_dir, fmt="movielens", progress=False)
        before = store.state.to_bytes()
        second = import_dataset(store, ml_dir, fmt="movielens", progress=False)
        assert (first.accepted, first.duplicates) == (5, 0)
        assert (second.accepted, second.duplicates) == (0, 5)
        assert store.state.to_bytes() == before
        assert store.log.count() == 5


def test_unknown_format_is_named(tmp_path: Path, sasrec_file: Path) -> None:
    """An unknown format is refused with the list of known ones."""
    with Store(tmp_path / "s") as store, pytest.raises(ValueError, match="format: expected one of"):
        import_dataset(store, sasrec_file, fmt="csv", progress=False)  # type: ignore[arg-type]


@pytest.mark.skipif(not (SHARED / "ml-100k" / "u.data").exists(),
                    reason="the shared MovieLens 100K copy is absent")
def test_movielens_100k_imports_whole(tmp_path: Path) -> None:
    """The real MovieLens 100K: 100,000 ratings by 943 users on 1,682 movies, 19 genres."""
    with Store(tmp_path / "s", snapshot_every=0) as store:
        report = import_dataset(store, SHARED / "ml-100k", fmt="movielens", progress=False)
        summary = store.state.summary()
    assert report.accepted == 100_000 + 1_682
    assert (summary["users"], summary["items"], summary["interactions"]) == (943, 1682, 100_000)
    assert summary["categories"] == 19
