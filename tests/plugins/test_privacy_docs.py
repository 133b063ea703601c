"""
The privacy plugins' documentation stays true: systemd/rerankd.toml shows every
parameter with its real default, and the README documents each built-in.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config, load_config
from plugins.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "systemd" / "rerankd.toml"
PRIVACY = ("pseudonymize", "mask", "noise")


def plain(values: dict[str, Any]) -> dict[str, Any]:
    """Tuples as lists, as TOML gives them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def commented_table(text: str, header: str) -> dict[str, Any]:
    """The ``# key = value`` lines after ``# [header]``, read as TOML (``# #`` lines are prose)."""
    lines = text.split(f"# [{header}]\n", 1)[1].splitlines()
    body = []
    for line in lines:
        if not line.startswith("# "):
            break
        if not line.startswith("# #"):
            body.append(line[2:])
    return tomllib.loads("\n".join(body))


def test_the_example_lists_the_default_plugins() -> None:
    """[plugins] in the example config is the embedded default."""
    example = load_config(EXAMPLE).plugins
    assert (Config().plugins.privacy, Config().plugins.policies) == (example.privacy,
                                                                     example.policies)  # fmt: skip


def test_the_example_shows_pseudonymize_defaults() -> None:
    """[plugins.pseudonymize] in the example has every parameter, at its default."""
    shown = dict(load_config(EXAMPLE).plugins.params["pseudonymize"])
    assert plain(Registry().defaults("pseudonymize")) == shown


def test_the_example_shows_mask_defaults_commented() -> None:
    """mask is off by default: its commented table has every parameter, at its default."""
    shown = commented_table(EXAMPLE.read_text(), "plugins.mask")
    assert plain(Registry().defaults("mask")) == shown


def test_the_example_shows_noise_defaults_commented() -> None:
    """noise is off by default: its commented table has every parameter but the unset seed."""
    shown = commented_table(EXAMPLE.read_text(), "plugins.noise")
    defaults = Registry().defaults("noise")
    assert None is defaults.pop("seed")  # TOML has no null: the example says it is unset
    assert defaults == shown


@pytest.mark.parametrize("name", PRIVACY)
def test_the_readme_documents_each_privacy_plugin(name: str) -> None:
    """The README's privacy section names every built-in privacy plugin."""
    privacy = (ROOT / "README.md").read_text().split("## Privacy", 1)[1].split("\n## ", 1)[0]
    assert f"`{name}`" in privacy
