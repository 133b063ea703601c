"""``retention``: its parameters, what it drops on ingest, and how the daemon finds it."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon._plugins import Plugins
from daemon.config import load_config
from eventstore import Event
from plugins.base import PluginError, PrivacyPlugin, RetentionPlugin
from plugins.context import PluginContext
from plugins.privacy.mask import Mask
from plugins.privacy.retention import Retention
from plugins.registry import PrivacyChain, Registry

MakeEvent = Callable[..., Event]
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "systemd" / "rerankd.toml"
DAY = 86_400.0
NOW = 1764250000.0 + 30 * DAY


def retention(**params: Any) -> Retention:
    """A plugin whose clock stands at NOW."""
    plugin = Retention(**{"max_age_days": 7, **params})
    plugin.clock = lambda: NOW
    return plugin


# --- parameters ----------------------------------------------------------------------


def test_the_age_is_given_in_days_and_kept_in_seconds() -> None:
    """max_age_days (fractions allowed) becomes max_age_s; the interval defaults to an hour."""
    plugin = Retention(max_age_days=0.5)
    assert (43_200.0, 3600.0) == (plugin.max_age_s, plugin.sweep_interval_s)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_age_days": 0}, "[plugins.retention].max_age_days: must be > 0, got 0"),
        ({"max_age_days": -1.5}, "[plugins.retention].max_age_days: must be > 0, got -1.5"),
        ({"max_age_days": "7"}, "[plugins.retention].max_age_days: must be a number, got '7'"),
        ({"max_age_days": True}, "[plugins.retention].max_age_days: must be a number, got True"),
        ({"max_age_days": float("inf")},
         "[plugins.retention].max_age_days: must be finite, got inf"),
        ({"max_age_days": 1, "sweep_interval_s": 0.05},
         "[plugins.retention].sweep_interval_s: must be >= 0.1, got 0.05"),
        ({"max_age_days": 1, "sweep_interval_s": None},
         "[plugins.retention].sweep_interval_s: must be a number, got None"),
    ],
)  # fmt: skip
def test_bad_parameters_name_the_key_and_the_rule(params: dict[str, Any], message: str) -> None:
    """Each bad value raises PluginError naming [plugins.retention].<key> and the rule."""
    with pytest.raises(PluginError) as info:
        Retention(**params)
    assert message == str(info.value)


def test_the_registry_builds_it_and_requires_the_age(tmp_path: Path) -> None:
    """Registered as ``retention``; without max_age_days the build fails naming it."""
    context = PluginContext(data_dir=tmp_path)
    built = Registry().build("retention", {"max_age_days": 2}, kind="privacy", context=context)

    with pytest.raises(PluginError, match=r"\[plugins.retention\].*max_age_days"):
        Registry().build("retention", {}, kind="privacy", context=context)
    assert (Retention, 2 * DAY) == (type(built), built.max_age_s)


# --- ingest, user ids, export ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["view", "click", "cart", "purchase", "rating", "like", "dislike", "skip",
             "impression"],
)  # fmt: skip
def test_interactions_older_than_the_age_are_dropped(make_event: MakeEvent, kind: str) -> None:
    """Every event type with a user (impressions too) is dropped once older than the age."""
    old = make_event(kind, 1, ts=NOW - 7 * DAY - 1)
    young = make_event(kind, 2, ts=NOW - 7 * DAY + 1)

    assert [young] == retention().ingest([old, young])


def test_catalogue_and_forget_events_are_never_dropped(make_event: MakeEvent) -> None:
    """item and forget events pass whatever their age, in order."""
    events = [make_event("item", 1, ts=NOW - 400 * DAY),
              make_event("forget", 2, ts=NOW - 400 * DAY),
              make_event("click", 3, ts=NOW - 400 * DAY)]  # fmt: skip

    assert events[:2] == retention().ingest(events)


def test_the_cutoff_follows_the_clock(make_event: MakeEvent) -> None:
    """The age is measured against the plugin's clock at each call."""
    plugin = retention(max_age_days=1)
    event = make_event("click", 1, ts=NOW - 0.5 * DAY)
    kept = plugin.ingest([event])

    plugin.clock = lambda: NOW + DAY

    assert ([event], []) == (kept, plugin.ingest([event]))


def test_user_ids_and_exports_pass_unchanged() -> None:
    """retention maps no id and changes no aggregate."""
    plugin = retention()
    aggregates = {"users": 3, "events": {"accepted": 9}}

    assert ("u-1", aggregates) == (plugin.user_id("u-1"), plugin.export(aggregates))


# --- found by shape -------------------------------------------------------------------


def test_it_is_a_privacy_plugin_that_asks_for_retention() -> None:
    """It satisfies PrivacyPlugin and RetentionPlugin; mask only the first."""
    assert ((True, True), (True, False)) == (
        (isinstance(retention(), PrivacyPlugin), isinstance(retention(), RetentionPlugin)),
        (isinstance(Mask(), PrivacyPlugin), isinstance(Mask(), RetentionPlugin)),
    )


class ThirdParty:
    """A plugin of another package that asks for retention by shape alone."""

    name = "third_party"
    max_age_s = 60.0
    sweep_interval_s = 7200.0

    def ingest(self, events: list[Event]) -> list[Event]:
        return events

    def user_id(self, user: str) -> str:
        return user

    def export(self, aggregates: dict[str, Any]) -> dict[str, Any]:
        return aggregates


def test_the_daemon_takes_the_shortest_age_and_interval_of_all_that_ask() -> None:
    """Plugins.retention: None without such plugins, else the minimum of each setting."""
    none = Plugins(PrivacyChain([Mask()]), ()).retention
    both = Plugins(PrivacyChain([retention(sweep_interval_s=30), Mask(), ThirdParty()]),
                   ()).retention  # fmt: skip

    assert (None, (60.0, 30.0)) == (none, (both.max_age_s, both.sweep_interval_s))


# --- documentation ----------------------------------------------------------------------


def commented_table(text: str, header: str) -> dict[str, Any]:
    """The ``# key = value`` lines after ``# [header]``, read as TOML (``# #`` lines are prose)."""
    lines = text.split(f"# [{header}]\n", 1)[1].splitlines()
    body = [line[2:] for line in lines[: next((k for k, line in enumerate(lines)
                                               if not line.startswith("# ")), len(lines))]
            if not line.startswith("# #")]  # fmt: skip
    return tomllib.loads("\n".join(body))


def test_the_example_config_shows_every_parameter() -> None:
    """The commented [plugins.retention] table has every key, at its default where it has one."""
    shown = commented_table(EXAMPLE.read_text(), "plugins.retention")
    defaults = Registry().defaults("retention")

    assert sorted(defaults) == sorted(shown)
    assert {k: v for k, v in defaults.items() if v is not ...} == {
        k: shown[k] for k, v in defaults.items() if v is not ...
    }
    Retention(**shown)  # and the example values are valid


def test_the_example_config_still_loads() -> None:
    """The example stays a valid config (retention stays off by default)."""
    assert "retention" not in load_config(EXAMPLE).plugins.privacy


def test_the_readme_documents_retention() -> None:
    """The README's privacy section names the plugin and its parameters."""
    privacy = (ROOT / "README.md").read_text().split("## Privacy", 1)[1].split("\n## ", 1)[0]
    assert all(word in privacy for word in ("`retention`", "max_age_days", "sweep_interval_s"))
