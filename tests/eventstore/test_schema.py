"""The event decoder: what it accepts, and the exact reason for everything it rejects."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from eventstore import EVENT_TYPES, Event, EventDecoder, EventRejectedError, Store
from eventstore.schema import INTERACTION_TYPES, ItemsShown, ItemUpdated, Rated, UserForgotten

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

T0 = 1764250000.0
NOW = T0 + 1e6  # the decoder fixture's clock
FLAT_RULE = "values must be strings, numbers, booleans, null or flat lists of those"
TYPES_RULE = "expected one of " + ", ".join(EVENT_TYPES)


def obj(kind: str = "click", **fields: object) -> bytes:
    """A JSON event of type ``kind``; ``field=...`` leaves a field out."""
    base: dict[str, object] = {"id": "e-1", "type": kind, "ts": T0}
    if kind != "item":
        base["user"] = "u-1"
    if kind in INTERACTION_TYPES or kind == "item":
        base["item"] = "i-1"
    if kind == "impression":
        base["items"] = ["i-1", "i-2"]
    if kind == "rating":
        base["value"] = 4.0
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def with_tail(kind: str, tail: bytes) -> bytes:
    """A valid event of ``kind`` whose closing brace is replaced by ``tail``."""
    return obj(kind)[:-1] + tail


NAN = with_tail("click", b', "value": NaN}')
DEEP_LIST = b"[" * 5000 + b"]" * 5000
DEEP_OBJECT = b'{"a":' * 3000 + b"1" + b"}" * 3000

#: (test id, input, the exact reason). Each reason names the field and the rule.
CORPUS: list[tuple[str, bytes, str]] = [
    # not JSON
    ("truncated", b'{"id":"e-1","type":"click"', "json: malformed (Input data was truncated)"),
    ("trailing-garbage", obj() + b" x",
     f"json: malformed (trailing characters (byte {len(obj()) + 2}))"),  # msgspec's position
    ("nan-literal", NAN, f"json: malformed (invalid character (byte {NAN.index(b'NaN')}))"),
    ("invalid-utf8", obj(user="u-1").replace(b"u-1", b"u-\xff"), "json: invalid UTF-8"),
    ("invalid-utf8-key", with_tail("click", b',"\xc3":1}'), "json: invalid UTF-8"),
    ("lone-surrogate", obj().replace(b'"u-1"', b'"\\ud800"'),
     ("json: malformed (unexpected end of escaped utf-16 surrogate pair "
      f"(byte {obj().index(b'u-1') + 6}))")),
    # not an object
    ("top-level-number", b"5", "event: expected a JSON object"),
    ("top-level-string", b'"click"', "event: expected a JSON object"),
    ("top-level-null", b"null", "event: expected a JSON object"),
    # type
    ("type-missing", obj(type=...), "type: required"),
    ("type-unknown", obj(type="tap"), f"type: {TYPES_RULE}"),
    ("type-int", obj(type=3), f"type: {TYPES_RULE}"),
    # wrong types per field
    ("id-int", obj(id=5), "id: expected a string, got an integer"),
    ("id-empty", obj(id=""), "id: must not be empty"),
    ("user-int", obj(user=42), "user: expected a string, got an integer"),
    ("user-list", obj(user=["u-1"]), "user: expected a string, got a list"),
    ("item-object", obj(item={}), "item: expected a string, got an object"),
    ("item-null", obj(item=None), "item: expected a string, got null"),
    ("ts-string", obj(ts="2025-11-27"), "ts: expected a finite number"),
    ("ts-bool", obj(ts=True), "ts: expected a finite number"),
    ("ts-null", obj(ts=None), "ts: expected a finite number"),
    ("value-string", obj(value="4"), "value: expected a number or null, got a string"),
    ("value-bool", obj(value=True), "value: expected a number or null, got a boolean"),
    ("rating-value-null", obj("rating", value=None), "value: expected a number, got null"),
    ("ranking-id-int", obj(ranking_id=7), "ranking_id: expected a string or null, got an integer"),
    ("context-list", obj(context=[1]), f"context: {FLAT_RULE}"),
    ("context-nested-object", obj(context={"page": {"n": 1}}), f"context: {FLAT_RULE}"),
    ("items-string", obj("impression", items="i-1"), "items: expected a list, got a string"),
    ("items-element-int", obj("impression", items=["i-1", 2]),
     "items[1]: expected a string, got an integer"),
    ("items-empty", obj("impression", items=[]), "items: must not be empty"),
    ("fields-list", obj("item", fields=[1]), f"fields: {FLAT_RULE}"),
    ("fields-nested-object", obj("item", fields={"dims": {"w": 1}}), f"fields: {FLAT_RULE}"),
    # required per type
    *[(f"user-missing-{t}", obj(t, user=...), f"user: required for type {t}")
      for t in INTERACTION_TYPES],
    *[(f"item-missing-{t}", obj(t, item=...), f"item: required for type {t}")
      for t in INTERACTION_TYPES],
    ("id-missing", obj(id=...), "id: required for type click"),
    ("ts-missing", obj("view", ts=...), "ts: required for type view"),
    ("value-missing-rating", obj("rating", value=...), "value: required for type rating"),
    ("item-missing-item", obj("item", item=...), "item: required for type item"),
    ("user-missing-impression", obj("impression", user=...), "user: required for type impression"),
    ("items-missing-impression", obj("impression", items=...),
     "items: required for type impression"),
    ("user-missing-forget", obj("forget", user=...), "user: required for type forget"),
    # unknown keys
    ("unknown-key", obj(extra=1), "extra: unknown field for type click"),
    ("user-on-item", obj("item", user="u-1"), "user: unknown field for type item"),
    ("item-on-forget", obj("forget", item="i-1"), "item: unknown field for type forget"),
    # sizes
    ("id-257-ascii", obj(id="x" * 257), "id: longer than 256 bytes"),
    ("id-129-two-byte-chars", obj(id="é" * 129), "id: longer than 256 bytes"),
    ("user-129-two-byte-chars", obj(user="é" * 129), "user: longer than 256 bytes"),
    ("user-65-four-byte-chars", obj(user="😀" * 65), "user: longer than 256 bytes"),
    ("item-multibyte-raw-utf8", json.dumps(json.loads(obj(item="é" * 129)),
                                           ensure_ascii=False).encode(),
     "item: longer than 256 bytes"),
    ("ranking-id-multibyte", obj(ranking_id="é" * 129), "ranking_id: longer than 256 bytes"),
    ("items-element-multibyte", obj("impression", items=["i-1", "é" * 129]),
     "items[1]: longer than 256 bytes"),
    ("user-60k-chars", obj(user="x" * 60_000), "user: longer than 256 bytes"),
    ("event-over-64k", obj(context={"q": "x" * 65_536}), "event: larger than 65536 bytes"),
    ("user-10mb", obj(user="x" * 10_000_000), "event: larger than 65536 bytes"),
    # numbers and time
    ("ts-1e400", with_tail("click", b"}").replace(b'"ts": 1764250000.0', b'"ts": 1e400'),
     "ts: expected a finite number"),
    ("value-1e400", with_tail("click", b', "value": 1e400}'), "value: expected a finite number"),
    ("ts-before-2000", obj(ts=946684799.0),
     "ts: before 2000-01-01 (expected seconds since the epoch)"),
    ("ts-in-milliseconds", obj(ts=T0 * 1000),
     "ts: after 2136-02-07 (expected seconds since the epoch)"),
    ("ts-future-skew", obj(ts=NOW + 301), "ts: more than 300 s in the future"),
    # nesting
    ("deep-object-in-context", with_tail("click", b', "context": {"a": ' + DEEP_OBJECT + b"}}"),
     f"context: {FLAT_RULE}"),
    ("deep-list-in-context", with_tail("click", b', "context": {"a": ' + DEEP_LIST + b"}}"),
     f"context: {FLAT_RULE}"),
    ("list-of-lists-in-fields", obj("item", fields={"tags": [["a"]]}), f"fields: {FLAT_RULE}"),
    ("deep-list-in-unknown-key", with_tail("click", b', "zz": ' + DEEP_LIST + b"}"),
     "zz: unknown field"),
    ("deep-object-in-unknown-key", with_tail("click", b', "zz": ' + DEEP_OBJECT + b"}"),
     "zz: unknown field"),
    # item fields
    ("price-negative", obj("item", fields={"price": -0.01}),
     "fields.price: expected a number >= 0"),
    ("price-string", obj("item", fields={"price": "9.99"}), "fields.price: expected a number >= 0"),
    ("price-bool", obj("item", fields={"price": True}), "fields.price: expected a number >= 0"),
    ("available-int", obj("item", fields={"available": 1}),
     "fields.available: expected true or false"),
    ("tags-string", obj("item", fields={"tags": "a,b"}), "fields.tags: expected a list of strings"),
    ("tags-mixed", obj("item", fields={"tags": ["a", 1]}),
     "fields.tags: expected a list of strings"),
    ("category-int", obj("item", fields={"category": 3}), "fields.category: expected a string"),
    ("title-list", obj("item", fields={"title": ["a"]}), "fields.title: expected a string"),
]


@pytest.mark.parametrize(("raw", "expected"), [pytest.param(r, e, id=i) for i, r, e in CORPUS])
def test_malformed_input_is_rejected_with_its_reason(decoder: EventDecoder, raw: bytes,
                                                     expected: str) -> None:
    """Each malformed input yields no event and one rejection whose message is exact."""
    result = decoder.decode(raw)

    assert ([], [expected]) == (result.events, [str(r.error) for r in result.rejected])


@pytest.mark.parametrize(("raw", "expected"), [pytest.param(r, e, id=i) for i, r, e in CORPUS])
def test_decode_one_raises_the_same_reason(decoder: EventDecoder, raw: bytes,
                                           expected: str) -> None:
    """decode_one raises EventRejectedError with the same message decode reports."""
    with pytest.raises(EventRejectedError) as info:
        decoder.decode_one(raw)

    assert expected == str(info.value)


@pytest.mark.parametrize("raw", [b"", b"   \n"], ids=["empty", "whitespace"])
def test_empty_input_is_a_json_error(decoder: EventDecoder, raw: bytes) -> None:
    """An empty body is rejected as a JSON problem (its wording is not pinned: see report)."""
    result = decoder.decode(raw)

    assert ([], ["json"]) == (result.events, [r.error.field for r in result.rejected])


def test_error_carries_field_and_rule(decoder: EventDecoder) -> None:
    """The exception keeps field and rule as attributes; the message is "<field>: <rule>"."""
    with pytest.raises(EventRejectedError) as info:
        decoder.decode_one(obj("rating", value=...))

    assert ("value", "required for type rating", None) == (
        info.value.field, info.value.rule, info.value.index)


# --- accepted inputs ---------------------------------------------------------------


@pytest.mark.parametrize("kind", EVENT_TYPES)
def test_every_type_decodes_to_its_struct(decoder: EventDecoder, kind: str) -> None:
    """A minimal valid event of each type decodes, and its struct's code is its type's index."""
    event = decoder.decode_one(obj(kind))

    assert (EVENT_TYPES.index(kind), "e-1", T0) == (event.code, event.id, event.ts)


def test_full_interaction_keeps_every_field(decoder: EventDecoder) -> None:
    """value, ranking_id and a flat context survive decoding unchanged."""
    raw = obj("rating", value=1.5, ranking_id="r-9",
              context={"page": "home", "position": 3, "tags": ["a", None], "ok": True})

    event = decoder.decode_one(raw)

    assert Rated(id="e-1", ts=T0, user="u-1", item="i-1", value=1.5, ranking_id="r-9",
                 context={"page": "home", "position": 3, "tags": ["a", None], "ok": True}) == event


def test_item_fields_are_kept(decoder: EventDecoder) -> None:
    """An item event with every known field (and a free-form one) is accepted as is."""
    fields = {"category": "shoes", "tags": ["red"], "price": 0, "available": False,
              "title": "Boot", "color": "red"}

    event = decoder.decode_one(obj("item", fields=fields))

    assert ItemUpdated(id="e-1", ts=T0, item="i-1", fields=fields) == event


def test_impression_and_forget_decode(decoder: EventDecoder) -> None:
    """Impressions keep their item order; forget needs only a user."""
    result = decoder.decode(b"[" + obj("impression", items=["b", "a", "c"]) + b","
                            + obj("forget", id="e-2") + b"]")

    assert [ItemsShown(id="e-1", ts=T0, user="u-1", items=["b", "a", "c"]),
            UserForgotten(id="e-2", ts=T0, user="u-1")] == result.events


@pytest.mark.parametrize("value", ["x" * 256, "é" * 128, "😀" * 64],
                         ids=["256-ascii", "128-two-byte", "64-four-byte"])
def test_id_of_exactly_256_bytes_is_accepted(decoder: EventDecoder, value: str) -> None:
    """The id limit is inclusive: 256 UTF-8 bytes pass, in any encoding width."""
    event = decoder.decode_one(obj(id=value, user=value, item=value, ranking_id=value))

    assert (value, value) == (event.id, event.user)


def test_event_of_exactly_64_kib_is_accepted(decoder: EventDecoder) -> None:
    """The size limit is inclusive: an event of exactly 65536 bytes passes, 65537 does not."""
    short = obj(context={"q": ""})
    exact = obj(context={"q": "x" * (65_536 - len(short))})
    over = obj(context={"q": "x" * (65_537 - len(short))})

    assert (65_536, 1, "event: larger than 65536 bytes") == (
        len(exact), len(decoder.decode(exact).events), str(decoder.decode(over).rejected[0].error))


def test_ts_limits_are_inclusive(decoder: EventDecoder) -> None:
    """2000-01-01T00:00:00Z itself and exactly max_future_skew_s ahead of the clock pass."""
    result = decoder.decode(b"[" + obj(ts=946684800.0) + b"," + obj(ts=NOW + 300) + b"]")

    assert [946684800.0, NOW + 300] == [e.ts for e in result.events]


# --- lists ---------------------------------------------------------------------------


def test_list_keeps_good_events_and_rejects_each_bad_one_with_its_index(
        decoder: EventDecoder) -> None:
    """In a mixed list, good events are kept in order and each bad one is rejected alone."""
    raw = b"[" + b",".join([
        obj(id="good-0"), obj(id="bad-1", user=5), b"17", obj(id="good-3"),
        obj(id="bad-4", ts=NOW + 3600), b"null", obj("view", id="good-6"),
    ]) + b"]"

    result = decoder.decode(raw)

    assert (["good-0", "good-3", "good-6"],
            [(1, "[1] user: expected a string, got an integer"),
             (2, "[2] event: expected a JSON object"),
             (4, "[4] ts: more than 300 s in the future"),
             (5, "[5] event: expected a JSON object")]) == (
        [e.id for e in result.events], [(r.index, str(r.error)) for r in result.rejected])


def test_list_of_non_objects_rejects_every_element(decoder: EventDecoder) -> None:
    """Every non-object element of a list is rejected with its own index."""
    result = decoder.decode(b'[null, "x", [], 5, true]')

    assert [(k, f"[{k}] event: expected a JSON object") for k in range(5)] == [
        (r.index, str(r.error)) for r in result.rejected]


def test_rejection_reason_has_no_index(decoder: EventDecoder) -> None:
    """``error.reason`` is the bare "<field>: <rule>", the index lives in ``error.index``."""
    result = decoder.decode(b"[" + obj(id="a") + b"," + obj(id="b", item=...) + b"]")

    assert [(1, "item: required for type click")] == [
        (r.error.index, r.error.reason) for r in result.rejected]


def test_list_with_an_oversized_element_rejects_only_that_element(decoder: EventDecoder) -> None:
    """A list over 64 KiB is fine; only its element over 64 KiB is rejected."""
    small = [obj(id=f"e-{k}", context={"q": "x" * 30_000}) for k in range(3)]
    big = obj(id="big", context={"q": "x" * 70_000})

    result = decoder.decode(b"[" + b",".join([*small, big]) + b"]")

    assert (["e-0", "e-1", "e-2"], [(3, "[3] event: larger than 65536 bytes")]) == (
        [e.id for e in result.events], [(r.index, str(r.error)) for r in result.rejected])


def test_truncated_list_is_rejected_whole(decoder: EventDecoder) -> None:
    """A list that is not valid JSON cannot be split: it is one rejection without an index."""
    result = decoder.decode(b"[" + obj(id="a") + b"," + obj(id="b")[:20])

    assert ([], [(None, "json: malformed (Input data was truncated)")]) == (
        result.events, [(r.index, str(r.error)) for r in result.rejected])


def test_empty_list_is_nothing(decoder: EventDecoder) -> None:
    """``[]`` is valid: no events, no rejections."""
    result = decoder.decode(b" []")

    assert ([], []) == (result.events, result.rejected)


def test_list_fast_and_slow_paths_give_the_same_events(decoder: EventDecoder) -> None:
    """The one-call list decode and element-by-element decoding agree on valid events."""
    good = [obj(kind, id=f"e-{k}", ts=T0 + k) for k, kind in enumerate(EVENT_TYPES)]
    good.append(obj("item", id="e-x", fields={"category": "c", "price": 1.5, "tags": ["t"]}))
    good.append(obj("click", id="e-y", value=2.0, ranking_id="r", context={"page": "p"}))

    fast = decoder.decode(b"[" + b",".join(good) + b"]")
    # one element msgspec cannot decode sends the whole list down the slow path
    slow = decoder.decode(b"[" + b",".join([*good, obj(user=1)]) + b"]")
    each = [decoder.decode_one(raw) for raw in good]

    assert (each, each, []) == (fast.events, slow.events, fast.rejected)


def test_rejected_list_element_keeps_its_raw_bytes(decoder: EventDecoder) -> None:
    """
    A rejected list element's ``raw`` is the bytes it arrived as, whichever decode
    path rejected it (the dead-letter table stores ``raw``).
    """
    good = obj(id="good")
    late = b'{ "ts": 1800000000, "id": "late", "user": "u-1", "item": "i-1", "type": "click" }'

    result = decoder.decode(b"[" + good + b", " + late + b"]")

    assert [(1, late)] == [(r.index, r.raw) for r in result.rejected]


# --- no values in messages -------------------------------------------------------------

SECRET = "secret-user-123"  # noqa: S105 - a user id, not a password


@pytest.mark.parametrize("raw", [
    obj(user=SECRET, ts="soon"),
    obj(user=SECRET, item=...),
    obj(user=SECRET, extra=True),
    obj(user=SECRET, context={"q": {"deep": SECRET}}),
    obj(user=SECRET, value=SECRET),
    obj(user=SECRET, ts=NOW + 10_000),
    obj(user=SECRET + "é" * 130),
    obj(id=SECRET * 20),
    obj(type=SECRET, user=SECRET),
    obj("item", item=SECRET, fields={"price": SECRET}),
    obj("item", item=SECRET, fields={"tags": [SECRET, 1]}),
    obj("impression", user=SECRET, items=[SECRET, 3]),
    obj(user=SECRET).replace(b'"i-1"', b'"\xff"'),
    obj(user=SECRET)[:-3],
    obj(user=SECRET) + b" " + SECRET.encode(),
    b"[" + obj(user=SECRET) + b"," + obj(user=SECRET, id=SECRET, item=5) + b"]",
], ids=lambda raw: str(len(raw)))
def test_messages_never_contain_the_rejected_values(decoder: EventDecoder, raw: bytes) -> None:
    """A rejection message names fields and rules, never a value (values may be personal data)."""
    result = decoder.decode(raw)

    messages = [str(r.error) for r in result.rejected]
    assert (1, []) == (len(messages), [m for m in messages if SECRET in m])


# --- ingest: everything rejected goes to the dead-letter table ----------------------------


def test_store_ingest_dead_letters_every_malformed_input(store: Store, store_dir: Path) -> None:
    """
    Ingesting the whole corpus appends nothing and keeps every input in the
    dead-letter table with its reason, source, size and (up to 1 MiB of) raw bytes.
    """
    # the reasons are the decoder's own (the corpus test above pins their wording)
    inputs = [(raw, str(store.decoder.decode(raw).rejected[0].error))
              for raw in [*(raw for _, raw, _ in CORPUS), b""]]

    results = [store.ingest(raw, source="test") for raw, _ in inputs]

    letters = sorted(store.log.read_dead_letters(limit=10_000), key=lambda d: d.seq)
    assert (0, 0, 0, [0] * len(inputs)) == (
        store.log.count(), store.state.n_users, store.state.n_items,
        [r.appended.accepted for r in results])
    assert [(expected, "test", len(raw), raw[: 1 << 20]) for raw, expected in inputs] == [
        (d.reason, d.source, d.size, d.raw) for d in letters]
    assert not (store_dir / "snapshots").exists() or not list((store_dir / "snapshots").iterdir())


def test_store_ingest_of_a_mixed_list_appends_the_good_and_dead_letters_the_bad(
        store: Store) -> None:
    """The good events of a mixed list are appended; each bad element is dead-lettered alone."""
    bad = obj(id="bad", item=...)
    raw = b"[" + obj(id="a") + b"," + bad + b"," + obj("view", id="b") + b"]"

    result = store.ingest(raw, source="mqtt:events")

    assert (["a", "b"], [("[1] item: required for type click", "mqtt:events", bad)]) == (
        store.log.ids(), [(d.reason, d.source, d.raw) for d in store.log.read_dead_letters()])
    assert ["accepted", "accepted"] == result.appended.status


def test_ingest_result_lists_the_rejections(store: Store,
                                            event_bytes: Callable[..., bytes]) -> None:
    """IngestResult.rejected reports what was refused, with indices, to the caller."""
    raw = b"[" + event_bytes(n=1) + b"," + event_bytes(n=2, ts=1.0) + b"]"

    result = store.ingest(raw, source="socket")

    assert [(1, "ts: before 2000-01-01 (expected seconds since the epoch)")] == [
        (r.index, r.error.reason) for r in result.rejected]


def test_decoded_events_are_events(decoder: EventDecoder) -> None:
    """Every decoded struct is an Event (what the log and the fold accept)."""
    result = decoder.decode(b"[" + b",".join(obj(k) for k in EVENT_TYPES) + b"]")

    assert [True] * len(EVENT_TYPES) == [isinstance(e, Event) for e in result.events]
