"""
The ``export`` op in the real daemon (tests/daemons.py), without and with ``noise``.

Two daemons take the same events through the socket: one with the default privacy
plugins answers the exact per-item aggregates, the other with ``noise`` after
``pseudonymize`` answers them noised.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import Daemon

from daemon.client import RequestFailedError

#: Every event at one time: "now" for the decay is the newest event, so an item's
#: popularity is exactly its number of interactions.
TS = time.time() - 60
ALICE, BOB = "alice@example.com", "bob@example.org"
#: item: (impressions, clicks, interactions, popularity, ctr), in row order
EXACT = {
    "hat-1": (10, 3, 4, 4.0, 0.3),
    "shoe-2": (4, 0, 2, 2.0, 0.0),
    "scarf-3": (0, 0, 0, 0.0, 0.0),
}
NOISE = "[plugins.noise]\nepsilon = 0.5\nseed = 7\n"


def events() -> list[dict[str, Any]]:
    """The catalogue, then impressions, clicks, a view and purchases giving `EXACT`."""
    out: list[dict[str, Any]] = [
        {"id": f"item-{i}", "type": "item", "item": i, "ts": TS, "fields": {"category": "c"}}
        for i in EXACT
    ]
    shown = [["hat-1", "shoe-2"]] * 4 + [["hat-1"]] * 6
    out += [{"id": f"shown-{n}", "type": "impression", "user": (ALICE, BOB)[n % 2],
             "items": items, "ts": TS} for n, items in enumerate(shown)]  # fmt: skip
    acts = [
        ("click", ALICE, "hat-1"),
        ("click", BOB, "hat-1"),
        ("click", ALICE, "hat-1"),
        ("view", BOB, "hat-1"),
        ("purchase", ALICE, "shoe-2"),
        ("purchase", BOB, "shoe-2"),
    ]
    out += [{"id": f"act-{n}", "type": kind, "user": user, "item": item, "ts": TS}
            for n, (kind, user, item) in enumerate(acts)]  # fmt: skip
    return out


def fed_daemon(tmp: Path, privacy: str) -> Iterator[Daemon]:
    """A daemon on ``tmp`` with ``privacy`` (and `NOISE`'s table when listed), fed `events`."""
    config = f"[ranking]\ntrain_on_start = false\n[plugins]\nprivacy = {privacy}\n"
    daemon = Daemon(tmp, config + (NOISE if "noise" in privacy else ""))
    try:
        daemon.wait_for("READY=1")
        with daemon.client() as client:
            assert len(events()) == client.request("ingest", events=events())["accepted"]
        yield daemon
    finally:
        daemon.close()


@pytest.fixture(name="exact", scope="module")
def fixture_exact(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon with the default privacy plugins (pseudonymize), fed `events`."""
    yield from fed_daemon(tmp_path_factory.mktemp("exact"), '["pseudonymize"]')


@pytest.fixture(name="noised", scope="module")
def fixture_noised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon with pseudonymize then noise (ε = 0.5, seeded), fed `events`."""
    yield from fed_daemon(tmp_path_factory.mktemp("noised"), '["pseudonymize", "noise"]')


def export(daemon: Daemon, **fields: Any) -> dict[str, Any]:
    with daemon.client() as client:
        answer = client.request("export", **fields)
    return {k: v for k, v in answer.items() if k not in {"id", "ok"}}


def table(answer: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    keys = ("impressions", "clicks", "interactions", "popularity", "ctr")
    return {it["item"]: tuple(it[k] for k in keys) for it in answer["items"]}


# ------------------------------------------------------------------------ exact


def test_without_noise_the_export_is_exact(exact: Daemon) -> None:
    """Every item in row order with its counts, popularity decayed to now and CTR."""
    answer = export(exact)
    assert (3, None) == (answer["total"], answer["next_offset"])
    assert EXACT == table(answer)
    assert list(EXACT) == [it["item"] for it in answer["items"]]
    assert "noise" not in answer


def test_pages_follow_row_order(exact: Daemon) -> None:
    """offset and limit page through the items; next_offset leads to the next page."""
    first = export(exact, limit=2)
    second = export(exact, offset=first["next_offset"], limit=2)
    beyond = export(exact, offset=10)
    assert (2, 2, None) == (len(first["items"]), first["next_offset"], second["next_offset"])
    assert export(exact)["items"] == first["items"] + second["items"]
    assert ([], 3, None) == (beyond["items"], beyond["total"], beyond["next_offset"])


@pytest.mark.parametrize(("fields", "message"), [
    ({"limit": 0}, "limit: must be 1 to 100000"),
    ({"limit": 100_001}, "limit: must be 1 to 100000"),
    ({"limit": "10"}, "limit: expected an integer, got a string"),
    ({"offset": -1}, "offset: must be at least 0"),
    ({"offset": 1.5}, "offset: expected an integer, got a number"),
    ({"user": ALICE}, "user: unknown field"),
])  # fmt: skip
def test_bad_fields_are_refused_naming_them(exact: Daemon, fields: dict[str, Any],
                                            message: str) -> None:  # fmt: skip
    """A bad offset or limit is a bad_request naming the field and the rule."""
    with pytest.raises(RequestFailedError) as caught:
        export(exact, **fields)
    assert ("bad_request", message) == (caught.value.code, caught.value.message)


# ------------------------------------------------------------------------ noised


def test_with_noise_the_export_is_noised_and_says_so(noised: Daemon, exact: Daemon) -> None:
    """
    Same items, order and total as the exact export; values noised (not all equal to
    the exact ones), never negative, CTR in [0, 1]; the noise entry names ε and s.
    """
    answer, truth = export(noised), export(exact)
    values = table(answer)
    assert {"mechanism": "laplace", "epsilon": 0.5, "sensitivity": 1.0} == answer["noise"]
    assert ([it["item"] for it in truth["items"]], 3) == (list(values), answer["total"])
    assert values != table(truth)
    # an exact 0 stays 0 when its draw is negative (clamped); every other number moves
    pairs = [(n, e) for item in EXACT for n, e in zip(values[item][:4], EXACT[item][:4],
                                                      strict=True)]  # fmt: skip
    assert all(n != e for n, e in pairs if e > 0)
    assert all(v >= 0 for row in values.values() for v in row)
    assert all(0 <= row[4] <= 1 for row in values.values())


def test_each_export_draws_anew(noised: Daemon) -> None:
    """Two exports of an unchanged state carry different noise (they compose: 2ε)."""
    assert table(export(noised)) != table(export(noised))


def test_no_user_id_leaves_in_an_export(noised: Daemon, exact: Daemon) -> None:
    """Neither a raw id nor a pseudonym appears in either export; stats are not noised."""
    texts = [json.dumps(export(d)) for d in (noised, exact)]
    with noised.client() as client:
        stats = client.request("stats")
    assert not any(needle in text for text in texts for needle in (ALICE, BOB, '"p:'))
    assert ["pseudonymize", "noise"] == stats["plugins"]["privacy"]
    assert "noise" not in stats
