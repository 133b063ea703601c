"""
Behaviour events: typed, frozen structures and a strict, fast decoder.

Every feed (socket, MQTT, Kafka, importers) speaks the JSON event format of
DESIGN.md. This module turns those bytes into typed events or a precise rejection.

Why msgspec structs rather than ``@dataclass(frozen=True, slots=True)``: msgspec
decodes *and validates* straight into these classes in C (about 0.7 µs per event
here, ten times faster than ``json.loads`` plus Python checks), and its tagged
unions give each event type its own required fields. The structs are frozen and
slotted, exactly what the style asks of events.

The decoder has two paths. The fast path decodes the whole input in one msgspec
call. Only when that fails does the slow path decode element by element and
translate msgspec's message into ours (``"<field>: <rule>"``), so valid traffic
pays nothing for good error messages, and one bad event in a list rejects only
itself.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, Union

import msgspec

from eventstore._errors import EventRejectedError

__all__ = [
    "EVENT_CLASSES",
    "EVENT_TYPES",
    "INTERACTION_TYPES",
    "JSON_TYPE_WORDS",
    "AddedToCart",
    "Clicked",
    "DecodeResult",
    "Disliked",
    "Event",
    "EventDecoder",
    "Interaction",
    "ItemUpdated",
    "ItemsShown",
    "Liked",
    "Limits",
    "Purchased",
    "Rated",
    "Rejection",
    "Skipped",
    "UserForgotten",
    "Viewed",
    "decode_stored_many",
    "encode_event",
    "split_validation_error",
]

#: Every event type, in the order of their numeric codes (stored in state arrays).
EVENT_TYPES: Final = (
    "view", "click", "cart", "purchase", "rating", "like", "dislike", "skip",
    "impression", "item", "forget",
)
#: The types that put an item into the user's sequence.
INTERACTION_TYPES: Final = EVENT_TYPES[:8]

MIN_TS: Final = 946_684_800.0  # 2000-01-01T00:00:00Z: older timestamps are typos or ms/µs mixups
# 2136-02-07: the state stores whole seconds since 2000 in uint32. A static bound, so
# out-of-range numbers fail inside msgspec's C code.
_MAX_TS: Final = MIN_TS + 2**32 - 1

# Ids are checked in characters by msgspec (cheap, in C) and in UTF-8 bytes by the
# decoder afterwards, only for ids long enough to possibly exceed the byte limit.
_ID_CHARS: Final = 256
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=_ID_CHARS)]
Ts = Annotated[float, msgspec.Meta(ge=MIN_TS, le=_MAX_TS)]
Scalar = Union[str, int, float, bool, None]  # noqa: UP007 - msgspec needs a runtime union
#: context and fields are flat: one level of keys, values scalars or lists of scalars.
#: Flatness is the rule that makes deep nesting impossible by construction.
Flat = dict[str, Union[Scalar, list[Scalar]]]  # noqa: UP007


class Event(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type",
            kw_only=True, omit_defaults=True, gc=False):
    """
    Base of every event: an idempotency key and the event time (seconds since epoch).

    ``gc=False``: events are never tracked by the cycle collector (decoded JSON cannot
    form reference cycles); a replay of a million events otherwise spends a third of
    its time in collector passes.
    """

    code: ClassVar[int]
    id: Id
    ts: Ts


class Interaction(Event, frozen=True):
    """A user did something with one item; it enters the user's sequence."""

    user: Id
    item: Id
    value: float | None = None
    ranking_id: Id | None = None
    context: Flat | None = None


class Viewed(Interaction, frozen=True, tag="view"):
    """The user viewed the item (``value``: dwell seconds, optional)."""

    code = 0


class Clicked(Interaction, frozen=True, tag="click"):
    """The user clicked the item."""

    code = 1


class AddedToCart(Interaction, frozen=True, tag="cart"):
    """The user put the item in a cart."""

    code = 2


class Purchased(Interaction, frozen=True, tag="purchase"):
    """The user bought the item (``value``: price paid, optional)."""

    code = 3


class Rated(Interaction, frozen=True, tag="rating"):
    """The user rated the item; ``value`` (the rating) is required."""

    code = 4
    value: float  # type: ignore[assignment]  # required here, optional elsewhere


class Liked(Interaction, frozen=True, tag="like"):
    """The user liked the item."""

    code = 5


class Disliked(Interaction, frozen=True, tag="dislike"):
    """The user disliked the item."""

    code = 6


class Skipped(Interaction, frozen=True, tag="skip"):
    """The user skipped the item."""

    code = 7


class ItemsShown(Event, frozen=True, tag="impression"):
    """The user was shown ``items``, in order (an impression)."""

    code = 8
    user: Id
    items: Annotated[list[Id], msgspec.Meta(min_length=1)]
    ranking_id: Id | None = None
    context: Flat | None = None


class ItemUpdated(Event, frozen=True, tag="item"):
    """Catalogue metadata for an item (category, tags, price, available, created_at, title)."""

    code = 9
    item: Id
    fields: Flat = {}


class UserForgotten(Event, frozen=True, tag="forget"):
    """Erase the user everywhere (the right to erasure)."""

    code = 10
    user: Id


AnyEvent = Union[  # noqa: UP007
    Viewed, Clicked, AddedToCart, Purchased, Rated, Liked, Disliked, Skipped,
    ItemsShown, ItemUpdated, UserForgotten,
]
#: Event type name -> event class, e.g. ``EVENT_CLASSES["click"] is Clicked``.
EVENT_CLASSES: Final[dict[str, type[Event]]] = {
    c.__struct_config__.tag: c for c in AnyEvent.__args__}
assert tuple(EVENT_CLASSES) == EVENT_TYPES

#: Known item fields and the rule each must satisfy; other keys are free-form.
_ITEM_FIELD_RULES: Final[dict[str, tuple[Callable[[Any], bool], str]]] = {
    "category": (lambda v: isinstance(v, str), "expected a string"),
    "title": (lambda v: isinstance(v, str), "expected a string"),
    "tags": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
             "expected a list of strings"),
    "price": (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v >= 0,
              "expected a number >= 0"),
    "available": (lambda v: isinstance(v, bool), "expected true or false"),
    # catalogue items may predate 2000 (a 1995 film): any time within ±3000 years
    "created_at": (lambda v: isinstance(v, int | float) and not isinstance(v, bool)
                   and abs(v) < 1e11, "expected a timestamp (seconds since the epoch)"),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """
    What the decoder accepts.

    Args:
        max_id_bytes: longest id (event, user, item, ranking) in UTF-8 bytes.
        max_event_bytes: largest single event, as JSON bytes.
        max_future_skew_s: how far past the decoder's clock an event time may lie.
    """

    max_id_bytes: int = 256
    max_event_bytes: int = 64 * 1024
    max_future_skew_s: float = 300.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_id_bytes <= _ID_CHARS:
            msg = f"max_id_bytes: expected 1..{_ID_CHARS}, got {self.max_id_bytes}"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class Rejection:
    """One input that was not accepted: its position, raw bytes and reason."""

    index: int | None
    raw: bytes
    error: EventRejectedError


@dataclass(frozen=True, slots=True)
class DecodeResult:
    """The accepted events of one input, in input order, and the rejected ones."""

    events: list[Event]
    rejected: list[Rejection]


_one: Final = msgspec.json.Decoder(AnyEvent)
_many: Final = msgspec.json.Decoder(list[AnyEvent])
_raws: Final = msgspec.json.Decoder(list[msgspec.Raw])
_encoder: Final = msgspec.json.Encoder()


class _TypeProbe(msgspec.Struct):
    type: Any = None


_probe: Final = msgspec.json.Decoder(_TypeProbe)


#: Canonical JSON bytes of an event (what the log stores); the encoder's own bound
#: method, so the append path pays no wrapper call.
encode_event: Final = _encoder.encode


def decode_stored_many(bodies: list[bytes]) -> list[Event]:
    """Decode many stored events in one msgspec call (replay's fast path)."""
    return _many.decode(b"[" + b",".join(bodies) + b"]")


class EventDecoder:
    """
    Decode JSON bytes (one event object or a list of them) into events.

    Args:
        limits: size and time limits.
        clock: returns "now" in seconds since epoch; injected so tests control it.
    """

    def __init__(self, limits: Limits | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.limits = limits or Limits()
        self._clock = clock

    def decode_one(self, data: bytes) -> Event:
        """
        Decode one event object.

        Raises:
            EventRejectedError: the input is not one valid event.
        """
        size = len(data)
        if size > self.limits.max_event_bytes:
            raise EventRejectedError("event", f"larger than {self.limits.max_event_bytes} bytes")
        try:
            event = _one.decode(data)
        except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError) as e:
            raise _translate(e, data) from None
        self._check(event, self._clock() + self.limits.max_future_skew_s)
        return event

    def decode(self, data: bytes) -> DecodeResult:
        """
        Decode one event object or a JSON list of them.

        A list is decoded in one call when every element is valid; otherwise each
        element is decoded alone, so each bad element is rejected with its own reason
        and the good ones are kept.
        """
        stripped = data.lstrip()
        if not stripped.startswith(b"["):
            try:
                return DecodeResult([self.decode_one(data)], [])
            except EventRejectedError as e:
                return DecodeResult([], [Rejection(None, data, e)])
        if len(data) > self.limits.max_event_bytes and self._has_oversized(data):
            return self._decode_each(data)
        try:
            events = _many.decode(data)
        except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
            return self._decode_each(data)
        return self._checked(data, events)

    def _has_oversized(self, data: bytes) -> bool:
        """Whether some element of a JSON list is over the event size limit (or unparsable)."""
        try:
            return max(map(len, _raws.decode(data)), default=0) > self.limits.max_event_bytes
        except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
            return True

    def _checked(self, data: bytes, events: list[Event]) -> DecodeResult:
        horizon = self._clock() + self.limits.max_future_skew_s
        short = self.limits.max_id_bytes // 4  # no string this short can exceed the limit
        interactions = _INTERACTIONS
        try:
            for event in events:
                # the common case decided inline (a method call per event costs 0.4 µs)
                if (type(event) in interactions and event.ts <= horizon  # type: ignore[attr-defined]
                        and len(event.id) <= short and len(event.user) <= short
                        and len(event.item) <= short and event.ranking_id is None):
                    continue
                self._check(event, horizon)
        except EventRejectedError:
            # rare: redo element by element, so each rejection keeps the bytes that arrived
            return self._decode_each(data)
        return DecodeResult(events, [])

    def _decode_each(self, data: bytes) -> DecodeResult:
        try:
            raws = _raws.decode(data)
        except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError) as e:
            return DecodeResult([], [Rejection(None, data, _translate(e, data))])
        good: list[Event] = []
        bad: list[Rejection] = []
        for i, raw in enumerate(raws):
            piece = bytes(raw)
            try:
                good.append(self.decode_one(piece))
            except EventRejectedError as e:
                e.index = i
                bad.append(Rejection(i, piece, e))
        return DecodeResult(good, bad)

    def _check(self, event: Event, horizon: float) -> None:
        """The rules msgspec cannot express: byte lengths, clock skew, item fields."""
        if event.ts > horizon:
            skew = self.limits.max_future_skew_s
            raise EventRejectedError("ts", f"more than {skew:g} s in the future")
        limit = self.limits.max_id_bytes
        short = limit // 4  # a string of at most this many characters cannot exceed the limit
        if type(event) in _INTERACTIONS and len(event.id) <= short and len(event.user) <= short \
                and len(event.item) <= short and event.ranking_id is None:
            return  # the common case, decided without the generic loop below
        for name in ("id", "user", "item", "ranking_id"):
            value = getattr(event, name, None)
            if value is not None and len(value) > short and len(value.encode()) > limit:
                raise EventRejectedError(name, f"longer than {limit} bytes")
        if isinstance(event, ItemsShown):
            for i, item in enumerate(event.items):
                if len(item) > short and len(item.encode()) > limit:
                    raise EventRejectedError(f"items[{i}]", f"longer than {limit} bytes")
        elif isinstance(event, ItemUpdated):
            _check_item_fields(event.fields)


_INTERACTIONS: Final = frozenset(Interaction.__subclasses__())


def _check_item_fields(fields: dict[str, Any]) -> None:
    for key, (ok, rule) in _ITEM_FIELD_RULES.items():
        if key in fields and not ok(fields[key]):
            raise EventRejectedError(f"fields.{key}", rule)


# --- translating msgspec's messages into "<field>: <rule>" ------------------------

_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_NAMED = re.compile(r"`(?P<name>[^`]*)`")
_GOT = re.compile(r"got `(?P<got>\w+)`")
#: msgspec's type names, in words for error messages.
JSON_TYPE_WORDS: Final = {"str": "a string", "int": "an integer", "float": "a number",
                      "bool": "a boolean", "null": "null", "array": "a list",
                      "object": "an object"}
_FLAT_RULE: Final = "values must be strings, numbers, booleans, null or flat lists of those"


def _translate(error: Exception, data: bytes) -> EventRejectedError:
    """Turn a msgspec (or UTF-8, or recursion) failure into our field/rule error."""
    if isinstance(error, UnicodeDecodeError):
        return EventRejectedError("json", "invalid UTF-8")
    if isinstance(error, RecursionError):
        return EventRejectedError("json", "nested too deeply")
    text = str(error)
    if not data.strip():
        return EventRejectedError("json", "empty input")
    if not isinstance(error, msgspec.ValidationError):  # malformed JSON, not a rule
        detail = text.removeprefix("JSON is malformed: ")
        return EventRejectedError("json", f"malformed ({detail})")
    what, path = split_validation_error(error)
    return _rule_for(what, _field_of(path), _type_of(data))


def split_validation_error(error: msgspec.ValidationError) -> tuple[str, str]:
    """
    msgspec's ``"<what> - at `$<path>`"`` as ``(what, path)``; path "" at the root.

    The socket protocol's decoder (in the daemon) words its errors from the same parts.
    """
    text = str(error)
    match = _AT.match(text)
    return (match["what"], match["path"] or "") if match else (text, "")


def _field_of(path: str) -> str:
    """``.context[...]`` -> ``context``; ``.items[3]`` -> ``items[3]``; root -> ``event``."""
    path = path.replace("[...]", "").lstrip(".")
    return _safe_name(path) if path else "event"


def _safe_name(name: str) -> str:
    """Field names come from the input: keep them short and printable."""
    cleaned = "".join(c if c.isprintable() else "?" for c in name)
    return cleaned if len(cleaned) <= 64 else cleaned[:61] + "..."


def _type_of(data: bytes) -> str | None:
    try:
        kind = _probe.decode(data).type
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return None
    return kind if kind in EVENT_TYPES else None


def _rule_for(what: str, field: str, kind: str | None) -> EventRejectedError:  # noqa: PLR0911
    for_type = f" for type {kind}" if kind else ""
    named = _NAMED.search(what)
    if what.startswith("Object missing required field"):
        name = named["name"] if named else "?"
        rule = "required" if name == "type" else f"required{for_type}"
        return EventRejectedError(_safe_name(name), rule)
    if what.startswith("Object contains unknown field"):
        return EventRejectedError(_safe_name(named["name"] if named else "?"),
                                  f"unknown field{for_type}")
    if field == "type":
        return EventRejectedError("type", f"expected one of {', '.join(EVENT_TYPES)}")
    root = field.split(".", maxsplit=1)[0].split("[", maxsplit=1)[0]
    if root in {"context", "fields"}:
        return EventRejectedError(root, _FLAT_RULE)
    if what == "Number out of range" or (field == "ts" and "`float`" in what):
        return _number_rule(what, field)
    if "of length <=" in what:
        # more than _ID_CHARS characters is always more than _ID_CHARS bytes
        return EventRejectedError(field, f"longer than {_ID_CHARS} bytes")
    if "of length >=" in what:
        return EventRejectedError(field, "must not be empty")
    if field == "event" and "`object`" in what:
        return EventRejectedError("event", "expected a JSON object")
    got = _GOT.search(what)
    expected = _NAMED.search(what)
    if got and expected:
        want = " or ".join(JSON_TYPE_WORDS.get(t.strip(), t.strip())
                           for t in expected["name"].split("|"))
        return EventRejectedError(field, f"expected {want}, got {JSON_TYPE_WORDS.get(got['got'], got['got'])}")
    return EventRejectedError(field, what[:1].lower() + what[1:])


def _number_rule(what: str, field: str) -> EventRejectedError:
    if field == "ts" and ">=" in what:
        return EventRejectedError("ts", "before 2000-01-01 (expected seconds since the epoch)")
    if field == "ts" and "<=" in what:
        return EventRejectedError("ts", "after 2136-02-07 (expected seconds since the epoch)")
    if field == "ts" and "got" in what:
        return EventRejectedError("ts", "expected a finite number")
    return EventRejectedError(field, "expected a finite number")
