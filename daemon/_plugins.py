"""
The configured plugins, built for the daemon and the offline commands.

`load_plugins` builds ``[plugins]`` through the registry (`plugins.registry`) with a
`PluginContext` made of the config and the environment. `check_user_ids` keeps the
stored user ids consistent: the state and the log are keyed by the ids the privacy
chain produces (pseudonyms), so the chain that writes to a log must map ids as the
chain that wrote it did. The log remembers a probe, the stored form of a fixed
string (a pseudonym of nothing personal, never the key), and a chain that maps the
probe otherwise (another key, another ``hex_chars``, pseudonymize switched on or off)
is refused at start; `Service.reload` refuses such a change on SIGHUP the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from daemon._errors import PluginError
from daemon.config import Config
from eventstore import EventLog
from plugins.base import PluginError as BasePluginError
from plugins.base import RankingPolicy, RetentionPlugin
from plugins.context import PluginContext
from plugins.registry import REGISTRY, PrivacyChain, Registry

__all__ = ["USER_ID_PROBE", "Plugins", "Retention", "check_user_ids", "load_plugins"]

#: The fixed string whose stored form identifies the user-id mapping.
USER_ID_PROBE: Final = "rerankd:user-id-probe"
#: The log's meta key holding the probe's stored form.
_META_KEY: Final = "user_id_probe"


@dataclass(frozen=True, slots=True)
class Plugins:
    """The built plugins: the privacy chain and the ranking policies, in configured order."""

    privacy: PrivacyChain
    policies: tuple[RankingPolicy, ...]

    @property
    def user_id_probe(self) -> str:
        """The stored form of `USER_ID_PROBE`: equal for two chains that map ids alike."""
        return self.privacy.user_id(USER_ID_PROBE)

    @property
    def retention(self) -> Retention | None:
        """
        What the privacy plugins ask of retention (by shape: `RetentionPlugin`), or None.

        With several, the shortest age and the shortest interval.
        """
        asking = [p for p in self.privacy.plugins if isinstance(p, RetentionPlugin)]
        if not asking:
            return None
        return Retention(min(float(p.max_age_s) for p in asking),
                         min(float(p.sweep_interval_s) for p in asking))


@dataclass(frozen=True, slots=True)
class Retention:
    """How old an event may get in the log, and how often the daemon sweeps."""

    max_age_s: float
    sweep_interval_s: float


def load_plugins(config: Config, *, dry_run: bool = False,
                 registry: Registry = REGISTRY) -> Plugins:  # fmt: skip
    """
    Build ``config.plugins`` (blocking: a key may be read or generated).

    Args:
        config: the configuration; ``[store].data_dir`` is the plugins' data directory.
        dry_run: only check the parameters (``rerankd check-config``): no file is
            created, and a plugin may be left unable to work.
        registry: where plugins are found.

    Raises:
        PluginError: a plugin is unknown, fails to load, has a bad parameter or is of
            the wrong kind; the message names the config file and the key.
    """
    section = config.plugins
    context = PluginContext.from_environment(config.store.data_dir, dry_run=dry_run)
    try:
        privacy = registry.privacy_chain(section.privacy, section.params, context=context)
        policies = registry.policies(section.policies, section.params, context=context)
    except BasePluginError as e:
        msg = f"{config.source}: {e}"
        raise PluginError(msg) from e
    return Plugins(privacy, policies)


def check_user_ids(log: EventLog, plugins: Plugins) -> None:
    """
    Refuse a privacy chain that maps user ids otherwise than the one ``log`` was written with.

    A log seen for the first time records the chain's probe. A log that already holds
    events but no probe was written before user ids were pseudonymized: it holds raw
    ids, and only a chain that leaves ids as they are may write to it.

    Raises:
        PluginError: the mapping differs; the message says why and what to do.
    """
    probe = plugins.user_id_probe
    stored = log.meta(_META_KEY)
    if stored == probe:
        return
    if stored is None:
        if log.count() and probe != USER_ID_PROBE:
            msg = (
                f"{log.path}: this log was written before user ids were pseudonymized "
                "(it holds raw ids), and [plugins].privacy now maps them; re-key the log "
                "(README, Key rotation) or leave pseudonymize out of [plugins].privacy"
            )
            raise PluginError(msg)
        log.set_meta(_META_KEY, probe)
        return
    msg = (
        f"{log.path}: the privacy plugins map user ids otherwise than when this log was "
        "written (another pseudonymization key or hex_chars, or pseudonymize switched on "
        "or off); the state and the log are keyed by the old pseudonyms. Restore the key "
        "and settings it was written with, or re-key the log (README, Key rotation)"
    )
    raise PluginError(msg)
