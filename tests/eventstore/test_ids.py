"""The in-memory id index: exact answers whatever the hashes do."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventstore._ids import IdIndex


def make_index(stored: dict[int, str], **kwargs: object) -> IdIndex:
    """An index whose verifier reads from ``stored`` (offset -> id), like the log."""
    return IdIndex(lambda offsets: {o: stored[o] for o in offsets if o in stored}, **kwargs)


@pytest.mark.parametrize("merge_every", [1, 3, 1 << 16])
def test_logged_ids_are_found_before_and_after_merges(merge_every: int) -> None:
    """Ids added are reported at their positions, new ones are not, across merges."""
    stored = {10 + k: f"e-{k}" for k in range(7)}
    index = make_index(stored, merge_every=merge_every)
    index.add((i, o) for o, i in stored.items())
    assert {0, 2} == index.logged(["e-3", "new", "e-6", "other"])
    assert 7 == len(index)


def test_hash_collisions_never_make_a_new_id_a_duplicate() -> None:
    """With every id hashing alike, only ids actually stored count as logged."""
    stored = {1: "a", 2: "b"}
    index = make_index(stored, hash_fn=lambda _: 42, merge_every=2)
    index.add([("a", 1)])
    index.add([("b", 2)])  # merged into the sorted arrays, colliding with "a"
    stored[3] = "c"
    index.add([("c", 3)])  # in the dict level
    stored[4] = "d"
    index.add([("d", 4)])  # collides inside the dict level: overflow
    assert {0, 2, 4, 5} == index.logged(["a", "x", "c", "y", "d", "b"])


def test_deleted_rows_are_not_reported() -> None:
    """An id whose row the log no longer holds (erased) is not a duplicate."""
    stored = {1: "gone", 2: "kept"}
    index = make_index(stored)
    index.add([(v, k) for k, v in stored.items()])
    del stored[1]
    assert {1} == index.logged(["gone", "kept"])


@pytest.mark.parametrize("merge_every", [1, 3, 1 << 16])
def test_forget_below_drops_exactly_the_older_entries(merge_every: int) -> None:
    """Entries below the offset go, from the arrays and the dict level alike."""
    stored = {k: f"id-{k}" for k in range(1, 11)}
    index = make_index(stored, merge_every=merge_every)
    index.add([(v, k) for k, v in stored.items()])

    dropped = index.forget_below(6)
    for k in range(1, 6):
        del stored[k]

    assert (5, 5) == (dropped, len(index))
    assert {5, 6, 7, 8, 9} == index.logged([f"id-{k}" for k in range(1, 11)])
    index.add([("id-11", 11)])
    assert (0, 6) == (index.forget_below(6), len(index))


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.lists(st.text(max_size=3), max_size=12), max_size=12),
       merge_every=st.integers(1, 8), colliding=st.booleans())
def test_index_agrees_with_a_set(batches: list[list[str]], merge_every: int,
                                 colliding: bool) -> None:  # noqa: FBT001
    """Batch by batch, logged() equals membership in the set of ids added before."""
    stored: dict[int, str] = {}
    index = make_index(stored, merge_every=merge_every,
                       hash_fn=(lambda s: len(s)) if colliding else hash)
    seen: set[str] = set()
    for batch in batches:
        expected = {k for k, i in enumerate(batch) if i in seen}
        assert expected == index.logged(batch)
        fresh = []
        for i in batch:
            if i not in seen:
                seen.add(i)
                offset = len(stored) + 1
                stored[offset] = i
                fresh.append((i, offset))
        index.add(fresh)


def test_bulk_built_index_equals_incremental() -> None:
    """from_log (one sort) answers like an index built by add, collisions included."""
    stored = {k: f"id-{k % 50}-{k}" for k in range(1, 200)}
    colliding = {"hash_fn": lambda s: len(s) % 7}
    bulk = IdIndex.from_log(lambda offs: {o: stored[o] for o in offs if o in stored},
                            [len(i) % 7 for i in stored.values()], list(stored), **colliding)
    step = make_index(stored, merge_every=16, **colliding)
    step.add((i, o) for o, i in stored.items())
    probe = [*stored.values(), "nope", "id-3-999"]
    assert step.logged(probe) == bulk.logged(probe) == set(range(len(stored)))
    bulk.add([("late", 500)])
    stored[500] = "late"
    assert {0} == bulk.logged(["late", "later"])
