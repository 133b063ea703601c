"""
The plugin registry: built-ins and third-party plugins found through the entry-point
group ``rerankd.plugins``, loaded lazily, built with checked parameters and kinds.

The third-party package is a real distribution written to a temporary directory (a
module and a ``*.dist-info`` with ``entry_points.txt``) and put on ``sys.path``, so
importlib.metadata finds it as it would an installed one.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import Daemon

from daemon._errors import PluginError as DaemonPluginError
from daemon._plugins import load_plugins
from daemon.config import Config, PluginsSection
from plugins.base import PluginError, PrivacyPlugin
from plugins.context import PluginContext
from plugins.privacy.mask import Mask
from plugins.privacy.pseudonymize import Pseudonymize
from plugins.registry import ENTRY_POINT_GROUP, PrivacyChain, Registry

BUILT_INS = {
    "pseudonymize": "plugins.privacy.pseudonymize:Pseudonymize",
    "mask": "plugins.privacy.mask:Mask",
    "noise": "plugins.privacy.noise:Noise",
    "mmr": "plugins.policies.mmr:MmrPolicy",
    "blend": "plugins.policies.blend:BlendPolicy",
    "rules": "plugins.policies.rules:RulesPolicy",
    "explore": "plugins.policies.explore:ExplorePolicy",
}
MODULE = "acme_rerankd_plugins"
ACME = '''
import msgspec


class Stamp:
    """A privacy plugin of a third party: writes key = value into every context."""

    name = "acme_stamp"

    def __init__(self, *, key="stamped_by", value="acme"):
        if not isinstance(value, str):
            from plugins.base import PluginError
            raise PluginError(f"[plugins.acme_stamp].value: must be a string, got {value!r}")
        self.key, self.value = key, value

    def ingest(self, events):
        return [msgspec.structs.replace(e, context={**(e.context or {}), self.key: self.value})
                if hasattr(e, "context") else e for e in events]

    def user_id(self, user):
        return user

    def export(self, aggregates):
        return dict(aggregates)


class WantsContext(Stamp):
    name = "acme_context"

    def __init__(self, *, context):
        super().__init__()
        self.context = context


class NotAPlugin:
    name = "acme_nothing"
'''
ENTRY_POINTS = f"""[{ENTRY_POINT_GROUP}]
acme_stamp = {MODULE}:Stamp
acme_context = {MODULE}:WantsContext
acme_nothing = {MODULE}:NotAPlugin
acme_broken = acme_rerankd_missing:Gone
"""


def write_distribution(directory: Path, name: str, entry_points: str, module: str = "") -> Path:
    """A distribution ``name`` in ``directory`` as pip would leave it: module + dist-info."""
    directory.mkdir(parents=True, exist_ok=True)
    if module:
        (directory / f"{MODULE}.py").write_text(module)
    info = directory / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    return directory


@pytest.fixture(name="acme")
def fixture_acme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The third-party distribution ``acme-rerankd`` on sys.path; its module unloaded after."""
    site = write_distribution(tmp_path / "site", "acme-rerankd", ENTRY_POINTS, ACME)
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop(MODULE, None)


@pytest.fixture(name="context")
def fixture_context(tmp_path: Path) -> PluginContext:
    return PluginContext(data_dir=tmp_path / "data")


# ---------------------------------------------------------------------------- finding


def test_built_ins_are_registered_as_entry_points() -> None:
    """Every built-in is an entry point of rerankd in the group, with the documented target."""
    found = {info.name: (info.value, info.distribution) for info in Registry().info()}
    assert {name: (value, "rerankd") for name, value in BUILT_INS.items()} == {
        name: found[name] for name in BUILT_INS
    }


def test_built_ins_load_through_their_entry_points() -> None:
    """Loading a name gives the class its entry point names."""
    registry = Registry()
    assert (Pseudonymize, Mask) == (registry.load("pseudonymize"), registry.load("mask"))


def test_an_unknown_name_is_an_error_naming_it() -> None:
    """An unknown plugin is refused with its name and the known ones."""
    with pytest.raises(PluginError) as caught:
        Registry().load("pseudonymise")
    message = str(caught.value)
    assert message.startswith("unknown plugin 'pseudonymise': no entry point of that name in "
                              "group 'rerankd.plugins'; known: ")  # fmt: skip
    assert "mask" in message


def test_a_third_party_plugin_is_found_built_and_run(acme: Path, context: PluginContext,
                                                     make_event: Any) -> None:  # fmt: skip
    """A plugin an installed package registers is listed, built with its table, and runs."""
    del acme
    registry = Registry()
    assert ("acme_stamp", f"{MODULE}:Stamp", "acme-rerankd") in {
        (i.name, i.value, i.distribution) for i in registry.info()
    }
    chain = registry.privacy_chain(["acme_stamp", "mask"], {"acme_stamp": {"value": "x"}},
                                   context=context)  # fmt: skip
    event = make_event("click", 1, context={"email": "a@b.example"})
    assert {"stamped_by": "x"} == chain.ingest([event])[0].context


def test_listing_imports_nothing(acme: Path) -> None:
    """Names and entry points are read without importing any plugin module."""
    del acme
    registry = Registry()
    assert {"acme_broken", "acme_stamp"} <= set(registry.names())
    registry.info()
    registry.load("mask")
    assert MODULE not in sys.modules


def test_a_broken_plugin_names_its_entry_point(acme: Path, context: PluginContext) -> None:
    """A plugin whose module cannot be imported fails with its name and entry point."""
    del acme
    with pytest.raises(PluginError) as caught:
        Registry().build("acme_broken", {}, kind="privacy", context=context)
    assert (
        "plugin 'acme_broken' (entry point acme_rerankd_missing:Gone in group "
        "'rerankd.plugins') failed to load: ModuleNotFoundError"
    ) in str(caught.value)


def test_a_name_registered_twice_is_an_error(acme: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Two distributions registering one name: refused, naming both."""
    del acme
    other = write_distribution(tmp_path / "other", "other-rerankd",
                               f"[{ENTRY_POINT_GROUP}]\nacme_stamp = somewhere:Else\n")  # fmt: skip
    monkeypatch.syspath_prepend(str(other))
    with pytest.raises(
        PluginError,
        match=r"'acme_stamp' is registered by several "
        r"distributions \(acme-rerankd, other-rerankd\)",
    ):
        Registry().load("acme_stamp")


# ---------------------------------------------------------------------------- building


@pytest.mark.parametrize(("name", "params", "message"), [
    ("mask", {"fields": ["email"]}, ("[plugins.mask].fields: unknown key; known: drop, "
                                     "extra_patterns, marker, mask, patterns")),
    ("mask", {"drop": "email"}, "[plugins.mask].drop: must be a list of non-empty strings"),
    ("pseudonymize", {"context": {}}, ("[plugins.pseudonymize].context: unknown key; known: "
                                       "credential, generate, hex_chars, key_file")),
    ("pseudonymize", {"hex_chars": "32"}, ("[plugins.pseudonymize].hex_chars: must be an "
                                           "integer between 16 and 64, got '32'")),
])  # fmt: skip
def test_bad_parameters_name_the_key(context: PluginContext, name: str, params: dict[str, Any],
                                     message: str) -> None:  # fmt: skip
    """An unknown or bad parameter is refused naming [plugins.<name>].<key>."""
    with pytest.raises(PluginError) as caught:
        Registry().build(name, params, kind="privacy", context=context)
    assert str(caught.value).startswith(message)


def test_a_third_party_plugin_checks_its_own_parameters(acme: Path, context: PluginContext) -> None:
    """The registry refuses unknown keys; the plugin's own PluginError names its key."""
    del acme
    registry = Registry()
    with pytest.raises(
        PluginError,
        match=r"^\[plugins.acme_stamp\].colour: unknown key; "
        r"known: key, value$",
    ):
        registry.build("acme_stamp", {"colour": "red"}, kind="privacy", context=context)
    with pytest.raises(PluginError, match=r"^\[plugins.acme_stamp\].value: must be a string"):
        registry.build("acme_stamp", {"value": 3}, kind="privacy", context=context)


def test_the_context_goes_only_to_plugins_that_ask(acme: Path, context: PluginContext) -> None:
    """A constructor with a context parameter gets the daemon's context; others are not given it."""
    del acme
    registry = Registry()
    assert context is registry.build("acme_context", {}, kind="privacy", context=context).context
    assert isinstance(registry.build("acme_stamp", {}, kind="privacy", context=context),
                      PrivacyPlugin)  # fmt: skip


def test_the_kind_is_checked(acme: Path, context: PluginContext) -> None:
    """A class that is not a privacy plugin is refused under privacy, and vice versa."""
    del acme
    registry = Registry()
    with pytest.raises(
        PluginError,
        match=r"^\[plugins\].privacy: 'acme_nothing' "
        r"\(acme_rerankd_plugins:NotAPlugin\) is not a privacy ",
    ):
        registry.build("acme_nothing", {}, kind="privacy", context=context)
    with pytest.raises(PluginError, match=r"^\[plugins\].policies: 'mask' .* is not a ranking "):
        registry.build("mask", {}, kind="policies", context=context)


def test_the_chain_runs_in_order(tmp_path: Path, make_event: Any) -> None:
    """Events and ids go through the plugins in the configured order."""
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    context = PluginContext(data_dir=tmp_path)
    pseudonymize = Pseudonymize(key_file=str(key), context=context)
    # mask after pseudonymize sees pseudonyms; an extra pattern on "p:" proves the order
    chain = PrivacyChain([pseudonymize, Mask(patterns=[], extra_patterns=["^p:"])])
    assert pseudonymize.user_id("u") == chain.user_id("u")
    out = chain.ingest([make_event("click", 1, context={"who": "p:1"})])
    assert {"who": "[masked]1"} == out[0].context
    assert pseudonymize.user_id("u-1") == out[0].user


def test_load_plugins_names_the_config_file() -> None:
    """The daemon's loader prefixes a plugin's error with the config file."""
    config = Config(plugins=PluginsSection(privacy=("mask",), params={"mask": {"drop": 1}}),
                    source="site.toml")  # fmt: skip
    with pytest.raises(DaemonPluginError, match=r"^site.toml: \[plugins.mask\].drop: must be "):
        load_plugins(config)


# ------------------------------------------------------------------------ in the daemon


def test_a_third_party_plugin_runs_in_the_daemon(acme: Path, tmp_path: Path) -> None:
    """
    Installed through its entry point, configured in [plugins] with its own table, the
    third-party plugin runs in a real daemon: what it writes is in the stored events.
    """
    config = (
        '[ranking]\ntrain_on_start = false\n[plugins]\nprivacy = ["pseudonymize", '
        '"acme_stamp"]\n[plugins.acme_stamp]\nkey = "origin"\nvalue = "third-party"\n'
    )
    daemon = Daemon(tmp_path, config, python_path=(acme,))
    try:
        daemon.wait_for("READY=1")
        with daemon.client() as client:
            event = {"id": "e-1", "type": "click", "user": "u", "item": "i", "ts": time.time()}
            assert 1 == client.request("ingest", events=[event])["accepted"]
        assert 0 == daemon.stop()
    finally:
        daemon.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "events.db")) as db:
        (body,) = db.execute("SELECT body FROM events WHERE id = 'e-1'").fetchone()
    assert {"origin": "third-party"} == json.loads(body)["context"]
    log = (tmp_path / "daemon.log").read_text()
    assert '"privacy": ["pseudonymize", "acme_stamp"]' in log
