"""``mask``: personal data in context and item fields, dropped or masked by name and by pattern."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plugins.base import PluginError, PrivacyPlugin
from plugins.privacy.mask import Mask

M = "[masked]"


@pytest.fixture(name="mask")
def fixture_mask() -> Mask:
    """The defaults: drop email and phone, mask ip, all four built-in patterns."""
    return Mask()


def test_keys_are_dropped_and_masked_by_name(mask: Mask) -> None:
    """drop removes the key, mask keeps it with the marker; names are case-insensitive."""
    context = {"Email": "x", "phone": 5, "IP": "anything", "page": "home"}
    assert {"IP": M, "page": "home"} == mask.masked(context)


def test_other_values_are_left_alone(mask: Mask) -> None:
    """Values that are no personal data pass unchanged; the very same dict comes back."""
    context = {"page": "search", "query": "red boots size 42", "position": 3, "ok": True,
               "version": "2.1.0", "date": "2025-11-27", "time": "12:30:45", "isbn":
               "978-3-16-148410-0", "sku": "A:B:C", "none": None, "tags": ["a", "b"]}  # fmt: skip
    assert context is mask.masked(context)


@pytest.mark.parametrize(("text", "expected"), [
    ("write to alice@example.com today", f"write to {M} today"),
    ("Ana.Lopez+shop@mail.example.co.uk", M),
    ("call +44 20 7946 0958", f"call {M}"),
    ("call +1 (555) 123-4567 now", f"call {M} now"),
    ("(555) 123-4567 or 555.123.4567", f"{M} or {M}"),
    ("from 203.0.113.7:443", f"from {M}:443"),
    ("client 2001:db8::8a2e:370:7334", f"client {M}"),
    ("loopback ::1 and ::ffff:192.0.2.128", f"loopback {M} and {M}"),
    ("ends a sentence: 2001:db8::1. And 192.0.2.1.", f"ends a sentence: {M}. And {M}."),
])  # fmt: skip
def test_values_are_masked_by_pattern(mask: Mask, text: str, expected: str) -> None:
    """Each built-in pattern replaces just its match inside a string."""
    assert {"q": expected} == mask.masked({"q": text})


@pytest.mark.parametrize("text", [
    "12:30:45", "999.1.1.1", "1.2.3", "a:b:c", "+12345", "order 5551234567", "user@localhost",
])  # fmt: skip
def test_lookalikes_are_not_masked(mask: Mask, text: str) -> None:
    """Times, non-addresses, short numbers and dotless domains are no match."""
    assert {"q": text} == mask.masked({"q": text})


def test_list_values_and_keys_are_scanned(mask: Mask) -> None:
    """Each string of a list is scanned; a key that is itself an email is dropped."""
    context = {"seen": ["a", "10.0.0.1", 3], "bob@example.org": 1, "page": "p"}
    assert {"seen": ["a", M, 3], "page": "p"} == mask.masked(context)


def test_ingest_masks_context_and_item_fields_only(mask: Mask, make_event: Any) -> None:
    """Interactions' and impressions' context and item events' fields; everything else kept."""
    context = {"email": "a@b.example", "page": "home"}
    click = make_event("click", 1, context=context)
    shown = make_event("impression", 2, context=context)
    item = make_event("item", 3, fields={"title": "Boots", "phone": "+33 1 23 45 67 89"})
    plain = make_event("click", 4, context={"page": "home"})
    out = mask.ingest([click, shown, item, plain])
    assert [{"page": "home"}] * 2 == [e.context for e in out[:2]]
    assert {"title": "Boots"} == out[2].fields
    assert out[3] is plain
    assert (click.id, click.user, click.item) == (out[0].id, out[0].user, out[0].item)


def test_extra_patterns_and_marker(make_event: Any) -> None:
    """extra_patterns add regular expressions; marker sets the replacement."""
    mask = Mask(patterns=[], extra_patterns=[r"\b\d{3}-\d{2}-\d{4}\b"], marker="<x>")
    event = make_event("click", 1, context={"note": "ssn 123-45-6789", "email": "kept@x.org"})
    assert {"note": "ssn <x>"} == mask.ingest([event])[0].context


@pytest.mark.parametrize(("params", "message"), [
    ({"drop": "email"}, "[plugins.mask].drop: must be a list of non-empty strings, got 'email'"),
    ({"mask": [""]}, "[plugins.mask].mask: must be a list of non-empty strings"),
    ({"patterns": ["ssn"]}, ("[plugins.mask].patterns[0]: unknown pattern; known: email, "
                             "phone, ipv4, ipv6, got 'ssn'")),
    ({"extra_patterns": ["ok", "("]}, ("[plugins.mask].extra_patterns[1]: not a valid regular "
                                       "expression")),
    ({"extra_patterns": ["x*"]}, ("[plugins.mask].extra_patterns[0]: must not match the empty "
                                  "string")),
    ({"marker": 1}, "[plugins.mask].marker: must be a string, got 1"),
    ({"marker": "x@y.org"}, "[plugins.mask].marker: must not itself match a value pattern"),
])  # fmt: skip
def test_bad_parameters_name_the_key(params: dict[str, Any], message: str) -> None:
    """Every bad parameter raises a PluginError naming [plugins.mask].<key>."""
    with pytest.raises(PluginError) as caught:
        Mask(**params)
    assert str(caught.value).startswith(message)


def test_mask_is_a_privacy_plugin_that_leaves_ids_alone(mask: Mask) -> None:
    """It satisfies the protocol; user ids and exports pass unchanged."""
    assert isinstance(mask, PrivacyPlugin)
    assert ("alice@example.com", {"n": 1}) == (mask.user_id("alice@example.com"),
                                               mask.export({"n": 1}))  # fmt: skip


_pieces = st.sampled_from([
    "alice@example.com", "+44 20 7946 0958", "(555) 123-4567", "203.0.113.7", "::1",
    "2001:db8::1", "12:30:45", "1.2.3", " ", ":", ".", "@", "+", "-", "(", ")", "a", "7",
    M, "[", "]",
])  # fmt: skip
_texts = st.lists(_pieces, max_size=8).map("".join) | st.text(max_size=30)
_values = _texts | st.integers() | st.none() | st.lists(_texts | st.integers(), max_size=3)
_contexts = st.dictionaries(st.sampled_from(["email", "IP", "q", "page", "x@y.org", "n"])
                            | st.text(max_size=8), _values, max_size=6)  # fmt: skip


@given(context=_contexts)
def test_masking_is_idempotent(context: dict[str, Any]) -> None:
    """Masking masked data changes nothing (STYLE.md: maskers are idempotent)."""
    mask = Mask()
    once = mask.masked(context)
    assert once == mask.masked(once)
