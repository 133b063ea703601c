"""The daemon's side of the plugins: building them from the config, and the user-id check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon._errors import PluginError
from daemon._plugins import USER_ID_PROBE, check_user_ids, load_plugins
from daemon.config import Config, PluginsSection, StoreSection
from eventstore import Store


def config(data_dir: Path, *privacy: str, **params: dict[str, Any]) -> Config:
    return Config(store=StoreSection(data_dir=data_dir),
                  plugins=PluginsSection(privacy=privacy, params=params))  # fmt: skip


def key(path: Path, byte: bytes) -> str:
    path.write_bytes(byte * 32)
    path.chmod(0o600)
    return str(path)


def test_the_default_pseudonymizes_with_a_generated_key(tmp_path: Path) -> None:
    """The embedded default builds pseudonymize alone, keyed in the data directory."""
    plugins = load_plugins(Config(store=StoreSection(data_dir=tmp_path)))
    assert (["pseudonymize"], ()) == (plugins.privacy.names, plugins.policies)
    assert plugins.privacy.user_id("u").startswith("p:")
    assert (tmp_path / "pseudonymize.key").exists()


def test_a_new_log_records_the_mapping_and_accepts_it_again(store: Store, tmp_path: Path) -> None:
    """The first check records the probe; the same chain passes later, another is refused."""
    same = config(tmp_path, "pseudonymize", pseudonymize={"key_file": key(tmp_path / "a", b"a")})
    other = config(tmp_path, "pseudonymize", pseudonymize={"key_file": key(tmp_path / "b", b"b")})
    check_user_ids(store.log, load_plugins(same))
    check_user_ids(store.log, load_plugins(same))
    with pytest.raises(PluginError, match="map user ids otherwise than when this log was written"):
        check_user_ids(store.log, load_plugins(other))
    with pytest.raises(PluginError, match="map user ids otherwise"):
        check_user_ids(store.log, load_plugins(config(tmp_path)))  # pseudonymize switched off


def test_a_log_of_raw_ids_takes_no_pseudonyms(store: Store, tmp_path: Path,
                                             make_event: Any) -> None:  # fmt: skip
    """A log written before pseudonymization holds raw ids: only an identity chain may go on."""
    store.append([make_event("click", 1, user="alice")])
    with pytest.raises(PluginError, match="written before user ids were pseudonymized"):
        check_user_ids(store.log, load_plugins(config(tmp_path, "pseudonymize")))
    check_user_ids(store.log, load_plugins(config(tmp_path, "mask")))
    assert USER_ID_PROBE == store.log.meta("user_id_probe")


def test_the_probe_is_no_key_material(tmp_path: Path) -> None:
    """What the log keeps is a pseudonym of a fixed string, not the key."""
    secret = b"s" * 32
    params = {"key_file": key(tmp_path / "k", b"s")}
    plugins = load_plugins(config(tmp_path, "pseudonymize", pseudonymize=params))
    assert plugins.user_id_probe == plugins.privacy.user_id(USER_ID_PROBE)
    assert secret.decode() not in plugins.user_id_probe
