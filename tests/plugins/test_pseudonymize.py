"""``pseudonymize``: the keyed mapping, its format, and where its key comes from."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path
from typing import Any

import pytest

from plugins.base import PluginError, PrivacyPlugin
from plugins.context import PluginContext
from plugins.privacy.pseudonymize import GENERATED_KEY_FILE, PREFIX, Pseudonymize

KEY = b"k" * 32
RAW = "alice@example.com"


def write_key(path: Path, key: bytes = KEY, mode: int = 0o600) -> Path:
    path.write_bytes(key)
    path.chmod(mode)
    return path


@pytest.fixture(name="context")
def fixture_context(tmp_path: Path) -> PluginContext:
    """A context whose data directory does not exist yet and with no credentials."""
    return PluginContext(data_dir=tmp_path / "data")


def with_key(tmp_path: Path, key: bytes = KEY, **params: object) -> Pseudonymize:
    path = write_key(tmp_path / f"key-{hashlib.sha256(key).hexdigest()[:8]}", key)
    return Pseudonymize(key_file=str(path), context=PluginContext(data_dir=tmp_path),
                        **params)  # type: ignore[arg-type]  # fmt: skip


# --------------------------------------------------------------------------- the mapping


def test_the_mapping_is_the_documented_hmac(tmp_path: Path) -> None:
    """A pseudonym is "p:" + the first 32 hex digits of HMAC-SHA256(key, utf8(id))."""
    expected = "p:" + hmac.new(KEY, RAW.encode(), hashlib.sha256).hexdigest()[:32]
    assert expected == with_key(tmp_path).user_id(RAW)


def test_the_format_is_prefix_and_hex_chars(tmp_path: Path) -> None:
    """hex_chars sets the length; every pseudonym is p: and lowercase hex."""
    for chars in (16, 32, 64):
        pseudonym = with_key(tmp_path, hex_chars=chars).user_id("u-1")
        assert re.fullmatch(rf"p:[0-9a-f]{{{chars}}}", pseudonym)


def test_one_key_maps_the_same_id_alike_and_ids_apart(tmp_path: Path) -> None:
    """Deterministic for one key (across instances), different for different ids."""
    a, b = with_key(tmp_path), with_key(tmp_path)
    assert a.user_id(RAW) == b.user_id(RAW)
    assert len({a.user_id(f"u-{n}") for n in range(1000)}) == 1000


def test_different_keys_give_different_pseudonyms(tmp_path: Path) -> None:
    """Two keys map one id to two pseudonyms."""
    assert with_key(tmp_path, KEY).user_id(RAW) != with_key(tmp_path, b"j" * 32).user_id(RAW)


def test_an_id_that_looks_like_a_pseudonym_is_still_mapped(tmp_path: Path) -> None:
    """Input starting with p: is never passed through: the stored id is always a MAC."""
    plugin = with_key(tmp_path)
    once = plugin.user_id(RAW)
    assert once != plugin.user_id(once)
    assert plugin.user_id(once).startswith(PREFIX)


def test_ingest_maps_every_event_with_a_user(tmp_path: Path, make_event: Any) -> None:
    """Interactions, impressions and forgets get the pseudonym; item events are untouched."""
    plugin = with_key(tmp_path)
    events = [make_event("click", 1, user=RAW), make_event("impression", 2, user=RAW),
              make_event("forget", 3, user=RAW), make_event("item", 4)]  # fmt: skip
    out = plugin.ingest(events)
    assert [plugin.user_id(RAW)] * 3 == [e.user for e in out[:3]]  # type: ignore[attr-defined]
    assert events[3] is out[3]
    assert [e.id for e in events] == [e.id for e in out]
    assert isinstance(plugin, PrivacyPlugin)


# ---------------------------------------------------------------------------- the key


def test_a_missing_key_file_is_an_error(tmp_path: Path, context: PluginContext) -> None:
    """A configured key_file that does not exist is refused, naming the key and the file."""
    with pytest.raises(PluginError) as caught:
        Pseudonymize(key_file=str(tmp_path / "absent"), context=context)
    assert str(caught.value).startswith("[plugins.pseudonymize].key_file: cannot read the key ")
    assert "absent" in str(caught.value)


def test_a_short_key_is_refused_without_showing_it(tmp_path: Path,
                                                   context: PluginContext) -> None:  # fmt: skip
    """A key under 32 bytes is refused; the message gives its length, never its bytes."""
    path = write_key(tmp_path / "short", b"sekrit-31-bytes-sekrit-31-bytes")
    with pytest.raises(PluginError) as caught:
        Pseudonymize(key_file=str(path), context=context)
    message = str(caught.value)
    assert "is 31 bytes; at least 32 are needed" in message
    assert "sekrit" not in message


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_key_file_others_can_read_is_refused(tmp_path: Path, context: PluginContext,
                                               mode: int) -> None:  # fmt: skip
    """A key file with any group or other permission is refused, saying how to fix it."""
    path = write_key(tmp_path / "key", mode=mode)
    with pytest.raises(PluginError) as caught:
        Pseudonymize(key_file=str(path), context=context)
    assert f"(mode {mode:04o}); `chmod 600 {path}`" in str(caught.value)


def test_one_trailing_newline_is_not_part_of_the_key(tmp_path: Path) -> None:
    """`openssl rand -hex 32 > FILE` writes a newline: the key is the hex without it."""
    hex_key = b"ab" * 32
    with_newline = with_key(tmp_path, hex_key + b"\n").user_id(RAW)
    assert with_key(tmp_path, hex_key).user_id(RAW) == with_newline


def test_the_key_is_generated_with_mode_0600_and_reused(context: PluginContext) -> None:
    """No key configured: one is generated in the data directory (0600) and read again later."""
    first = Pseudonymize(context=context)
    path = context.data_dir / GENERATED_KEY_FILE
    assert 0o600 == path.stat().st_mode & 0o777
    assert len(path.read_bytes().strip()) == 64  # 32 random bytes as hex
    assert f"generated {path}" == first.key_origin
    assert first.user_id(RAW) == Pseudonymize(context=context).user_id(RAW)
    assert [path] == list(context.data_dir.iterdir())  # no temporary left


def test_generation_ignores_the_umask(context: PluginContext) -> None:
    """Even under a umask that would take the owner's write bit, the file is 0600."""
    context.data_dir.mkdir()
    old = os.umask(0o277)
    try:
        Pseudonymize(context=context)
    finally:
        os.umask(old)
    assert 0o600 == (context.data_dir / GENERATED_KEY_FILE).stat().st_mode & 0o777


def test_generate_false_makes_a_missing_key_an_error(context: PluginContext) -> None:
    """With generate = false and no key anywhere, nothing is created and the error says why."""
    with pytest.raises(PluginError, match=r"^\[plugins.pseudonymize\]: no key: "):
        Pseudonymize(generate=False, context=context)
    assert not context.data_dir.exists()


def test_the_credential_comes_before_the_generated_key(tmp_path: Path) -> None:
    """A systemd credential of the configured name is used when key_file is empty."""
    creds = tmp_path / "creds"
    creds.mkdir()
    write_key(creds / "rerankd-hmac-key", mode=0o440)  # systemd's mode: not checked
    context = PluginContext(data_dir=tmp_path / "data", credentials_dir=creds)
    plugin = Pseudonymize(context=context)
    assert "credential rerankd-hmac-key" == plugin.key_origin
    assert with_key(tmp_path).user_id(RAW) == plugin.user_id(RAW)
    assert not (tmp_path / "data").exists()


def test_a_dry_run_creates_nothing_and_maps_nothing(context: PluginContext) -> None:
    """check-config's dry run generates no key; the object it builds refuses to map."""
    dry = PluginContext(data_dir=context.data_dir, dry_run=True)
    plugin = Pseudonymize(context=dry)
    assert not context.data_dir.exists()
    with pytest.raises(PluginError, match="dry run"):
        plugin.user_id(RAW)


@pytest.mark.parametrize(("params", "message"), [
    ({"hex_chars": 15}, "[plugins.pseudonymize].hex_chars: must be an integer between 16 and 64"),
    ({"hex_chars": 66}, "[plugins.pseudonymize].hex_chars: must be an integer between 16 and 64"),
    ({"hex_chars": 19}, "[plugins.pseudonymize].hex_chars: must be even, got 19"),
    ({"generate": "yes"}, "[plugins.pseudonymize].generate: must be true or false, got 'yes'"),
    ({"key_file": 7}, "[plugins.pseudonymize].key_file: must be a string, got 7"),
])  # fmt: skip
def test_bad_parameters_name_the_key(context: PluginContext, params: dict[str, object],
                                     message: str) -> None:  # fmt: skip
    """Every bad parameter raises a PluginError naming [plugins.pseudonymize].<key>."""
    with pytest.raises(PluginError) as caught:
        Pseudonymize(context=context, **params)  # type: ignore[arg-type]
    assert str(caught.value).startswith(message)
