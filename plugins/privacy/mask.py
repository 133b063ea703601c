r"""
``mask``: personal data in ``context`` and item ``fields`` is dropped or masked before storage.

It looks at the ``context`` of interactions and impressions and at the ``fields`` of
item events (both flat: scalars and lists of scalars), and applies, in this order:

- **by name** (case-insensitive): keys in ``drop`` are removed; the values of keys in
  ``mask`` become the marker (a list value becomes one marker string).
- **by value**: in every remaining string (and every string of a list), each match of
  a value pattern is replaced by the marker, so ``"call +44 20 7946 0958 today"`` keeps
  its words; a *key* that matches a pattern is removed with its value.

Built-in patterns (``patterns``), each written to miss rather than mangle ordinary
values:

``email``
    ``local@domain.tld`` (a dotted domain is required).
``phone``
    International numbers, ``+`` then 7 to 15 digits with spaces, dots, dashes or
    brackets between (E.164 allows at most 15), and the North American form
    ``(555) 123-4567`` / ``555-123-4567`` / ``555.123.4567``. Local numbers written
    without separators look like any other number: add a pattern for your format.
``ipv4``
    Dotted quads of 0..255 (a four-part version string such as ``1.2.3.4`` is masked
    too: a false positive costs less than a leaked address).
``ipv6``
    Any candidate of hex groups and colons that :mod:`ipaddress` accepts as an IPv6
    address (``::1``, ``2001:db8::7334``, with an embedded IPv4); ``12:30:45`` is not one.

``extra_patterns`` adds regular expressions of your own (Python syntax).

The marker is a fixed string, ``"[masked]"`` by default, not a hash: an unkeyed hash
of a value from a small space (an IPv4 address, a phone number) is reversed by
trying them all, and a keyed one would be pseudonymization, which is
``pseudonymize``'s job with its key management. The marker must not match a
pattern itself. Masking is idempotent: masking masked data changes nothing (a
property test checks it for the built-in patterns).

Patterns see strings only: a phone number sent as a JSON number is not recognised.
Masking a field that ranking reads (``price``, ``available``, ``created_at``,
``category``, ``tags``) turns it into a string that ranking ignores; drop it instead.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Final

import msgspec

from eventstore.schema import Event, Interaction, ItemsShown, ItemUpdated
from plugins.params import check_str, check_str_list, param_error

__all__ = ["BUILTIN_PATTERNS", "DEFAULT_MARKER", "Mask"]

_NAME: Final = "mask"
DEFAULT_MARKER: Final = "[masked]"
_OCTET: Final = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
#: The built-in value patterns by name (``ipv6`` candidates are also checked by ipaddress).
BUILTIN_PATTERNS: Final[Mapping[str, str]] = {
    "email": r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}",
    "phone": (r"(?<![\w+])\+[1-9](?:[ .\-()]{0,2}\d){6,14}(?!\d)"
              r"|(?<![\w+])(?:\(\d{3}\)[ .\-]?|\d{3}[ .\-])\d{3}[ .\-]\d{4}(?!\d)"),
    "ipv4": rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)",
    "ipv6": (r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
             rf"(?:{_OCTET}(?:\.{_OCTET}){{3}}|[0-9A-Fa-f]{{1,4}})?(?![\w:]|\.\d)"),
}  # fmt: skip
_EVENTS_WITH_CONTEXT: Final = frozenset((*Interaction.__subclasses__(), ItemsShown))


class Mask:
    """
    Drop or mask personal data in ``context`` and item ``fields`` (see the module docstring).

    Args:
        drop: keys removed (case-insensitive).
        mask: keys whose values become the marker (case-insensitive).
        patterns: built-in value patterns applied: any of email, phone, ipv4, ipv6.
        extra_patterns: more value patterns, Python regular expressions.
        marker: what replaces a masked value or match.

    Raises:
        PluginError: a bad parameter: not a list of strings, an unknown pattern name,
            a regular expression that does not compile; the message names
            ``[plugins.mask].<key>``.
    """

    name: ClassVar[str] = _NAME

    def __init__(
        self, *, drop: Sequence[str] = ("email", "phone"), mask: Sequence[str] = ("ip",),
        patterns: Sequence[str] = tuple(BUILTIN_PATTERNS), extra_patterns: Sequence[str] = (),
        marker: str = DEFAULT_MARKER,
    ) -> None:  # fmt: skip
        self.drop = frozenset(k.lower() for k in check_str_list(_NAME, "drop", drop))
        self.mask = frozenset(k.lower() for k in check_str_list(_NAME, "mask", mask))
        self.marker = check_str(_NAME, "marker", marker, max_chars=64)
        self.patterns = check_str_list(_NAME, "patterns", patterns)
        self.extra_patterns = check_str_list(_NAME, "extra_patterns", extra_patterns)
        self._search, self._sub = _compile(self.patterns, self.extra_patterns, self.marker)
        self._untouched = None if self.extra_patterns else _untouched_by(self.drop | self.mask)

    def __repr__(self) -> str:
        return (
            f"Mask(drop={sorted(self.drop)}, mask={sorted(self.mask)}, "
            f"patterns={list(self.patterns)}, extra_patterns={len(self.extra_patterns)})"
        )

    def ingest(self, events: Sequence[Event]) -> list[Event]:
        """The events with their ``context`` / ``fields`` masked (unchanged ones as they were)."""
        replace = msgspec.structs.replace
        out: list[Event] = []
        for event in events:
            kind = type(event)
            if kind in _EVENTS_WITH_CONTEXT and event.context:  # type: ignore[attr-defined]
                context = self.masked(event.context)  # type: ignore[attr-defined]
                if context is not event.context:  # type: ignore[attr-defined]
                    event = replace(event, context=context)  # noqa: PLW2901
            elif kind is ItemUpdated and event.fields:  # type: ignore[attr-defined]
                fields = self.masked(event.fields)  # type: ignore[attr-defined]
                if fields is not event.fields:  # type: ignore[attr-defined]
                    event = replace(event, fields=fields)  # noqa: PLW2901
            out.append(event)
        return out

    def masked(self, flat: Mapping[str, Any]) -> Mapping[str, Any]:
        """``flat`` masked; the very same object when nothing had to change."""
        if self._untouched is not None and self._untouched(flat):
            return flat
        out: dict[str, Any] | None = None
        for n, (key, value) in enumerate(flat.items()):
            lower = key.lower()
            if lower in self.drop or self._search(key):
                new: Any = _DROPPED
            elif lower in self.mask:
                new = self.marker
            else:
                new = self._value(value)
            if new is value and out is None:
                continue
            if out is None:  # the first change: copy what came before it
                out = dict(list(flat.items())[:n])
            if new is not _DROPPED:
                out[key] = new
        return flat if out is None else out

    def _value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._sub(value) if self._search(value) else value
        if isinstance(value, list) and any(isinstance(v, str) and self._search(v) for v in value):
            return [self._sub(v) if isinstance(v, str) else v for v in value]
        return value

    def user_id(self, user: str) -> str:
        """User ids are ``pseudonymize``'s business: unchanged."""
        return user

    def export(self, aggregates: Mapping[str, Any]) -> dict[str, Any]:
        """Aggregates carry no context or fields: unchanged."""
        return dict(aggregates)


_DROPPED: Final = object()
_MAX_ROUNDS: Final = 8
#: The order the built-in patterns run in, whatever the configured one (see _patterns).
_ORDER: Final = ("email", "ipv6", "ipv4", "phone")
#: A character every built-in pattern needs one of: one scan in C rules most strings out.
_QUICK: Final = re.compile(r"[@:\d]").search
_DIGITS: Final = re.compile(r"\d").findall
#: What a string must hold for each built-in pattern to possibly match.
_HINTS: Final[Mapping[str, Callable[[str], Any]]] = {
    "email": lambda text: "@" in text,
    "phone": lambda text: len(_DIGITS(text)) >= 7,
    "ipv4": lambda text: text.count(".") >= 3,
    "ipv6": lambda text: text.count(":") >= 2,
}


def _hinted(text: str) -> bool:
    """Whether ``text`` could match a built-in pattern: one C scan, then their hints."""
    return _QUICK(text) is not None and any(hint(text) for hint in _HINTS.values())


def _always(text: str) -> bool:
    """The hint of an extra pattern: it always runs."""
    del text
    return True


def _untouched_by(names: frozenset[str]) -> Callable[[Mapping[str, Any]], bool]:
    """
    A quick test for the common case, with the built-in patterns only.

    True when no key is named and no key or string value could match a pattern, so
    nothing can change: about a third of the cost of the full walk (lists take that).
    """
    hinted = _hinted

    def untouched(flat: Mapping[str, Any]) -> bool:
        for key, value in flat.items():
            if key.lower() in names or hinted(key):
                return False
            kind = type(value)
            if (kind is str and hinted(value)) or kind is list:
                return False
        return True

    return untouched


def _compile(names: Sequence[str], extra: Sequence[str],
             marker: str) -> tuple[Callable[[str], bool], Callable[[str], str]]:  # fmt: skip
    """
    The value patterns as a ``search`` (is there a match?) and a ``sub``.

    ``sub`` puts the marker in place of each match.

    Each built-in pattern runs only on strings holding a character it cannot match
    without ("@" for email, a digit for phone and ipv4, two colons for ipv6): most
    strings (words, names) are ruled out by a few substring tests, at a tenth of the
    cost of running the expressions (about 0.7 µs each on a short string here).
    """
    patterns = _patterns(names, extra)

    def valid(name: str, match: re.Match[str]) -> bool:
        # an IPv6-shaped candidate that is no address (a time, "a:b:c") is no match
        return name != "ipv6" or _is_ipv6(match.group())

    def replacer(name: str) -> Callable[[re.Match[str]], str]:
        return lambda match: marker if valid(name, match) else match.group()

    # one scan in C first: a string without any hint character matches no built-in
    quick = _QUICK if not extra else None

    def search(text: str) -> bool:
        if quick is not None and quick(text) is None:
            return False
        return any(hint(text) and any(valid(name, m) for m in pattern.finditer(text))
                   for name, pattern, hint in patterns)  # fmt: skip

    steps = [(pattern, hint, replacer(name)) for name, pattern, hint in patterns]

    def sub(text: str) -> str:
        return _settled(text, steps)

    if search(marker):
        raise param_error(_NAME, "marker", "must not itself match a value pattern", marker)
    return search, sub


_Pattern = tuple[str, re.Pattern[str], Callable[[str], Any]]


def _patterns(names: Sequence[str], extra: Sequence[str]) -> list[_Pattern]:
    """
    (name, compiled pattern, the quick test a string must pass to be worth matching).

    The built-in ones in a fixed order, whatever the configured one: ipv6 before ipv4,
    so the IPv4 tail of ``::ffff:192.0.2.128`` is not masked first and the rest left.
    """
    out: list[_Pattern] = []
    for k, name in enumerate(names):
        if name not in BUILTIN_PATTERNS:
            known = ", ".join(BUILTIN_PATTERNS)
            raise param_error(_NAME, f"patterns[{k}]", f"unknown pattern; known: {known}", name)
    out += [
        (name, re.compile(BUILTIN_PATTERNS[name]), _HINTS[name]) for name in _ORDER if name in names
    ]
    for k, text in enumerate(extra):
        try:
            pattern = re.compile(text)
        except re.error as e:
            rule = f"not a valid regular expression ({e})"
            raise param_error(_NAME, f"extra_patterns[{k}]", rule) from None
        if pattern.fullmatch("") is not None:
            raise param_error(_NAME, f"extra_patterns[{k}]", "must not match the empty string")
        out.append((f"extra_{k}", pattern, _always))
    return out


def _settled(text: str, steps: Sequence[tuple[re.Pattern[str], Callable[[str], Any],
                                              Callable[[re.Match[str]], str]]]) -> str:  # fmt: skip
    """
    ``text`` with every step's replacements made, again until nothing changes.

    A replacement can make a match of what was next to it (a "+44 ..." behind an email
    is a phone number only once the email is gone), and masking must be idempotent.
    The marker matches no pattern (checked), so a few rounds settle it; the bound only
    guards against odd extra patterns.
    """
    for _ in range(_MAX_ROUNDS):
        masked = text
        for pattern, hint, replace in steps:
            if hint(masked):
                masked = pattern.sub(replace, masked)
        if masked == text:
            break
        text = masked
    return text


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True
