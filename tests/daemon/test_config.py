"""Config loading: strict TOML into frozen dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon._errors import ConfigError
from daemon.config import Config, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "rerankd.toml"


def test_no_file_is_the_embedded_default() -> None:
    """Without a file the store lives under ./var with FULL durability."""
    config = load_config(None)
    assert config == Config()
    assert (config.store.data_dir, config.store.synchronous) == (Path("var"), "FULL")


def test_example_config_equals_the_defaults() -> None:
    """systemd/rerankd.toml shows every default; loading it changes nothing."""
    config = load_config(EXAMPLE)
    assert (config.store, config.fold, config.limits) == (Config().store, Config().fold,
                                                          Config().limits)


@pytest.mark.parametrize(("text", "message"), [
    ("[store]\nbogus = 1\n", "[store].bogus: unknown key; known: data_dir"),
    ("[nope]\n", "[nope]: unknown section; known: fold, kafka, limits, metrics, mqtt, online, plugins, ranking, server, store"),
    ('[fold]\nseq_len = "x"\n', "[fold].seq_len: expected int"),
    ("[fold]\nseq_len = 0\n", "seq_len: expected 1..4096, got 0"),
    ("[fold.weights]\nclik = 1.0\n", "weights: unknown event types ['clik']"),
    ('[store]\nsynchronous = "SOMETIMES"\n', "expected OFF, NORMAL, FULL or EXTRA"),
    ("[store\n", "file: not valid TOML"),
    ('[mqtt]\nurl = "http://broker"\n', "[mqtt]: url must start with mqtt:// or mqtts://"),
    ("[mqtt]\nreceive_maximum = 0\n", "[mqtt]: receive_maximum must be between 1 and 65535"),
    ('[mqtt]\ntopics = "a/#"\n', "[mqtt].topics: expected"),
    ('[kafka]\nsecurity_protocol = "TLS"\n', "[kafka]: security_protocol must be PLAINTEXT"),
    ('[kafka]\ngroup_id = ""\n', "[kafka]: group_id must not be empty"),
    ("[online]\nlearning_rate = 0\n", "[online]: learning_rate must be > 0"),
    ("[ranking]\nrefresh_share = 0\n", "[ranking]: refresh_share must be > 0 and <= 1"),
    ("[ranking]\nrefresh_share = 1.5\n", "[ranking]: refresh_share must be > 0 and <= 1"),
    ("[online]\nenabled = 1.5\n", "[online].enabled: expected bool"),
    ('[plugins]\nprivacy = ["nope"]\n', ("[plugins].privacy: unknown plugin 'nope'; known "
                                          "(entry points rerankd.plugins): ")),
    ('[plugins]\nprivacy = "mask"\n', "[plugins].privacy: expected a list of plugin names"),
    ('[plugins]\nprivacy = ["mask", "mask"]\n', "[plugins].privacy: 'mask' is listed twice"),
    ('[plugins]\nprivacy = ["mask"]\npolicies = ["mask"]\n',
     "[plugins]: 'mask' is listed both as a privacy plugin and as a policy"),
    ("[plugins.mask]\ndrop = []\n", "[plugins.mask]: parameters for a plugin that is not listed"),
    ("[plugins]\nmask = 1\n", ("[plugins].mask: unknown key; known: privacy, policies, and a "
                                "[plugins.<name>] table per listed plugin")),
])
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    """Every mistake raises ConfigError naming the file and what is wrong."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist is reported, not a traceback."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_values_are_converted(tmp_path: Path) -> None:
    """Overrides reach the dataclasses, with the configured weights merged over the defaults."""
    path = tmp_path / "c.toml"
    path.write_text('[store]\ndata_dir = "/tmp/x"\n[fold]\nseq_len = 20\n[fold.weights]\nview = 0.5\n')
    config = load_config(path)
    assert config.store.data_dir == Path("/tmp/x")
    assert config.fold.seq_len == 20
    assert (config.fold.weights["view"], config.fold.weights["purchase"]) == (0.5, 5.0)
