"""
Regression: an impression that introduces a new item when the item arrays are full.

``s.impressions[s.item_slot(item)] += 1`` evaluated the memoryview of the *old* array
before ``item_slot`` grew the columns, so the increment indexed it out of bounds
(``IndexError``), after the event was committed: the fold was left half-applied and
every later ``Store`` open replayed the event and failed again. A state restored
from a snapshot has item capacity == item count, so the next new item shown in an
impression hit it; a fresh state at its 1024th, 2048th, ... item. Fixed in ec438ba.
"""

from __future__ import annotations

from eventstore import FoldConfig, State, Store, apply
from eventstore.schema import ItemsShown, Viewed

TS = 1_700_000_000.0


def test_impression_of_a_new_item_at_item_capacity_is_counted():
    """An impression whose item is new and does not fit the item arrays counts one impression."""
    state = State(FoldConfig(), items=16)
    for k in range(16):
        apply(state, Viewed(id=f"v{k}", ts=TS, user="u", item=f"i{k}"))

    apply(state, ItemsShown(id="shown", ts=TS, user="u", items=["new"]))

    assert 1 == state.item_view("new")["impressions"]


def test_store_reopens_after_an_impression_of_a_new_item_following_a_restore(tmp_path):
    """After a restore, an impression of a new item is appended, folded and replayed."""
    with Store(tmp_path) as store:
        store.append([Viewed(id=f"v{k}", ts=TS, user="u", item=f"i{k}") for k in range(20)])
    with Store(tmp_path) as store:  # restored from the snapshot written by close()
        store.append([ItemsShown(id="shown", ts=TS, user="u", items=["new"])])

    with Store(tmp_path) as store:
        assert 1 == store.state.item_view("new")["impressions"]
