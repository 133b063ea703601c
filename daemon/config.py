"""
The daemon's configuration: TOML into frozen dataclasses, strictly.

Every section maps onto a frozen dataclass; an unknown section or key, or a value of
the wrong type, raises :class:`ConfigError` naming the file, ``[section].key`` and
the fix (unlike loaders that silently ignore unknown keys). With no file, the
embedded default applies: everything under ``./var/``, no broker.
"""

from __future__ import annotations

import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import msgspec

from daemon._errors import ConfigError
from daemon.online import OnlineOptions
from eventstore import FoldConfig, Limits
from plugins.registry import REGISTRY

__all__ = [
    "Config",
    "KafkaSection",
    "MetricsSection",
    "MqttSection",
    "PluginsSection",
    "RankingSection",
    "ServerSection",
    "StoreSection",
    "load_config",
]

DEFAULTS_SOURCE: Final = "<defaults>"
#: The privacy plugins of the embedded default: user ids are pseudonymized.
DEFAULT_PRIVACY: Final = ("pseudonymize",)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSection:
    """
    ``[store]``: where and how events are kept.

    Args:
        data_dir: holds ``events.db`` and ``snapshots/`` (relative to the working directory).
        synchronous: SQLite durability; ``FULL`` (default) means an acknowledged event is on disk.
        snapshot_every_events: write a snapshot after this many new events.
        snapshot_interval_s: the daemon also writes one when this long has passed since
            the last and new events arrived (0: only by count).
        keep_snapshots: snapshot files kept.
    """

    data_dir: Path = Path("var")
    synchronous: str = "FULL"
    snapshot_every_events: int = 100_000
    snapshot_interval_s: float = 300.0
    keep_snapshots: int = 2

    def __post_init__(self) -> None:
        if self.synchronous not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            msg = f"expected OFF, NORMAL, FULL or EXTRA, got {self.synchronous!r}"
            raise ValueError(msg)
        if self.snapshot_every_events < 0 or self.keep_snapshots < 1:
            msg = "snapshot_every_events must be >= 0 and keep_snapshots >= 1"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSection:
    """
    ``[server]``: the Unix socket and its limits.

    Args:
        socket_path: where to listen (ignored under socket activation, which hands
            the daemon its socket).
        socket_mode: permission bits of the socket file (0o660: owner and group).
        allowed_uids: peers (SO_PEERCRED) allowed besides the daemon's own uid and
            root; empty with ``allowed_gids`` empty means only those two.
        allowed_gids: peers whose primary gid is listed are allowed too.
        max_line_bytes: longest request line; longer ones close the connection.
        max_candidates: most candidates per rank request.
        max_connections: concurrent connections; more are refused.
        max_in_flight: unanswered requests per connection; the daemon stops reading
            that connection until some are answered.
        idle_timeout_s: a connection without a request for this long is closed.
        write_timeout_s: a client that does not read its answers for this long is dropped.
        graceful_timeout_s: on SIGTERM, how long in-flight requests may take to finish.
    """

    socket_path: Path = Path("var/rerankd.sock")
    socket_mode: int = 0o660
    allowed_uids: tuple[int, ...] = ()
    allowed_gids: tuple[int, ...] = ()
    max_line_bytes: int = 1_048_576
    max_candidates: int = 5000
    max_connections: int = 1024
    max_in_flight: int = 64
    idle_timeout_s: float = 300.0
    write_timeout_s: float = 10.0
    graceful_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        positive = ("max_line_bytes", "max_candidates", "max_connections", "max_in_flight",
                    "idle_timeout_s", "write_timeout_s", "graceful_timeout_s")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                msg = f"{name} must be > 0"
                raise ValueError(msg)
        if not 0 <= self.socket_mode <= 0o777:
            msg = "socket_mode must be permission bits, e.g. 0o660"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True, kw_only=True)
class RankingSection:
    """
    ``[ranking]``: the model and how scores are fused.

    Args:
        model_path: a model file from ``rerankd train``; empty: rank by features alone.
        popularity_weight: weight of log(1 + decayed item popularity).
        interest_weight: weight of the user's decayed interest in the item's category.
        freshness_weight: weight of 2^(-age / half-life) of the item's ``created_at``.
        max_batch: most rank requests served by one kernel call.
        batch_buckets: batch sizes the kernels are compiled for at start (a batch is
            padded up to the next one); the largest must be at least ``max_batch``.
        candidate_buckets: candidate counts compiled for; the largest must be at
            least [server].max_candidates for the model to score every request.
        record_impressions: log what each answer showed (an ``impression`` event with
            its ranking_id), so that later clicks attribute to it.
        refresh_vectors: re-encode a user's vector in the background as soon as the
            user's events are folded, so that the next rank finds it ready.
        refresh_share: the most of the kernel thread's time that background
            re-encoding may take (0 < share <= 1); it also waits while ranks wait
            for the kernels. When events touch users faster than this share can
            encode them, the rest are encoded by their next rank, in its batch.
        cold_start: give each item the state knows and the model does not (one that
            arrived after training) a stand-in embedding until the next retrain: the
            mean of the model items of its category, else of those sharing a tag, else
            of the most popular ones (`daemon._coldstart`). Off: such items get no dot
            product and rank by their features alone.
        train_on_start: with no model_path, train a small model from the log in the
            background (written to ``<data_dir>/model.safetensors`` and used by later
            starts too), ranking by features until it is ready.
        train_max_seconds: time bound of that training.
    """

    model_path: Path | None = None
    popularity_weight: float = 0.5
    interest_weight: float = 1.0
    freshness_weight: float = 0.2
    max_batch: int = 64
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    candidate_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
    record_impressions: bool = True
    refresh_vectors: bool = True
    refresh_share: float = 0.25
    cold_start: bool = True
    train_on_start: bool = True
    train_max_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.train_max_seconds <= 0:
            msg = "train_max_seconds must be > 0"
            raise ValueError(msg)
        if self.max_batch < 1:
            msg = "max_batch must be >= 1"
            raise ValueError(msg)
        if not 0.0 < self.refresh_share <= 1.0:
            msg = "refresh_share must be > 0 and <= 1"
            raise ValueError(msg)
        for name in ("batch_buckets", "candidate_buckets"):
            values = getattr(self, name)
            if not values or list(values) != sorted(set(values)) or values[0] < 1:
                msg = f"{name} must be strictly increasing positive integers"
                raise ValueError(msg)
        if self.batch_buckets[-1] < self.max_batch:
            msg = "batch_buckets: the largest must be at least max_batch"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSection:
    """
    ``[metrics]``: the optional Prometheus endpoint.

    Args:
        listen: ``host:port`` to serve ``/metrics`` on (e.g. ``127.0.0.1:9464``);
            empty: no endpoint (the ``stats`` op still answers).
    """

    listen: str = ""

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if self.listen and (not sep or not port.isdigit() or not 0 < int(port) < 65536):
            msg = "listen must be host:port, e.g. 127.0.0.1:9464"
            raise ValueError(msg)
        del host


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttSection:
    """
    ``[mqtt]``: the MQTT feed (off while ``url`` is empty).

    Args:
        url: ``mqtt://host:port`` (plain) or ``mqtts://host:port`` (TLS).
        topics: topic filters subscribed at QoS 1.
        client_id: stable client id: the broker keeps this daemon's session (and the
            messages queued while it is away) under it. Two daemons need two ids.
        session_expiry_s: how long the broker keeps the session after a disconnect;
            longer than the longest outage, or messages published meanwhile are lost.
        receive_maximum: most unacknowledged messages the broker sends at once; a
            message is acknowledged only once it is durable, so this bounds what is
            in flight (and the broker holds the rest while the writer is behind).
        keepalive_s: MQTT keep-alive interval.
        username: empty: anonymous.
        password_file: file holding the password; a relative name is looked up in
            ``$CREDENTIALS_DIRECTORY`` first (systemd's LoadCredential).
        ca_file: CA bundle for ``mqtts://`` (empty: the system's).
        reconnect_min_s: first reconnect delay; doubled on each failure (with jitter) ...
        reconnect_max_s: ... up to this.
        dead_letter_topic: also publish rejected payloads here (empty: only the
            dead-letter table).
    """

    url: str = ""
    topics: tuple[str, ...] = ("rerankd/events/#",)
    client_id: str = "rerankd"
    session_expiry_s: int = 7 * 86_400
    receive_maximum: int = 1000
    keepalive_s: int = 30
    username: str = ""
    password_file: str = ""
    ca_file: str = ""
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    dead_letter_topic: str = ""

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("mqtt://", "mqtts://")):
            msg = "url must start with mqtt:// or mqtts://"
            raise ValueError(msg)
        if self.url and not self.topics:
            msg = "topics must name at least one topic filter"
            raise ValueError(msg)
        if not self.client_id:
            msg = "client_id must not be empty (the session is kept under it)"
            raise ValueError(msg)
        if not 1 <= self.receive_maximum <= 65535:
            msg = "receive_maximum must be between 1 and 65535"
            raise ValueError(msg)
        if self.session_expiry_s < 0 or self.keepalive_s < 1:
            msg = "session_expiry_s must be >= 0 and keepalive_s >= 1"
            raise ValueError(msg)
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            msg = "reconnect delays must satisfy 0 < reconnect_min_s <= reconnect_max_s"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaSection:
    """
    ``[kafka]``: the Kafka feed (off while ``bootstrap`` is empty).

    Args:
        bootstrap: ``host:port[,host:port...]`` of the brokers.
        topics: topics consumed.
        group_id: the consumer group; daemons in one group share the partitions.
        instance_id: static group membership (KIP-345): a daemon restarted within
            ``session_timeout_s`` gets its partitions back without a rebalance, so no
            other member consumes them meanwhile. Empty: ``<group_id>-<hostname>``.
            Two daemons in one group need two ids.
        session_timeout_s: how long the group waits for a silent member.
        max_batch: most messages made durable in one transaction.
        security_protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
        sasl_mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with SASL_*).
        sasl_username: the SASL user.
        sasl_password_file: file holding the SASL password; a relative name is looked
            up in ``$CREDENTIALS_DIRECTORY`` first (systemd's LoadCredential).
        ca_file: CA bundle for SSL (empty: the system's).
        commit_offsets: also commit the stored offsets to Kafka (for lag tooling; the
            offsets that count are in the event log).
        dead_letter_topic: also produce rejected payloads here (empty: only the
            dead-letter table).
    """

    bootstrap: str = ""
    topics: tuple[str, ...] = ("rerankd-events",)
    group_id: str = "rerankd"
    instance_id: str = ""
    session_timeout_s: float = 30.0
    max_batch: int = 1000
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password_file: str = ""
    ca_file: str = ""
    commit_offsets: bool = True
    dead_letter_topic: str = ""

    def __post_init__(self) -> None:
        if self.bootstrap and not self.topics:
            msg = "topics must name at least one topic"
            raise ValueError(msg)
        if not self.group_id:
            msg = "group_id must not be empty"
            raise ValueError(msg)
        if self.security_protocol not in {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}:
            msg = "security_protocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
            raise ValueError(msg)
        if self.sasl_mechanism not in {"", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"}:
            msg = "sasl_mechanism must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
            raise ValueError(msg)
        if self.max_batch < 1 or self.session_timeout_s <= 0:
            msg = "max_batch must be >= 1 and session_timeout_s > 0"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginsSection:
    """
    ``[plugins]``: which plugins run, in which order, with which parameters.

    Names are entry points of the group ``rerankd.plugins`` (`plugins.registry`):
    the built-ins and whatever third-party packages are installed.

    Args:
        privacy: privacy plugins, in the order each event goes through them before it
            is stored (and each request's user id before it is looked up).
            Default: ``pseudonymize`` alone.
        policies: ranking policies, in the order they re-rank each answer.
        params: the ``[plugins.<name>]`` tables: each listed plugin's parameters
            (unset ones take the plugin's defaults). A table for a plugin that is not
            listed is an error, so a typo cannot silently leave a plugin unconfigured.
    """

    privacy: tuple[str, ...] = DEFAULT_PRIVACY
    policies: tuple[str, ...] = ()
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = _plugins_problem(self.privacy, self.policies, self.params)
        if problem is not None:
            msg = f"{problem[0]}: {problem[1]}"
            raise ValueError(msg)
        # an empty table sets nothing: the same as no table (check-config prints one)
        frozen = {name: MappingProxyType(dict(table))
                  for name, table in self.params.items() if table}  # fmt: skip
        object.__setattr__(self, "params", MappingProxyType(frozen))

    @property
    def names(self) -> tuple[str, ...]:
        """Every listed plugin: the privacy plugins, then the policies."""
        return (*self.privacy, *self.policies)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration; ``source`` names the file it came from."""

    store: StoreSection = field(default_factory=StoreSection)
    fold: FoldConfig = field(default_factory=FoldConfig)
    limits: Limits = field(default_factory=Limits)
    server: ServerSection = field(default_factory=ServerSection)
    ranking: RankingSection = field(default_factory=RankingSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    kafka: KafkaSection = field(default_factory=KafkaSection)
    online: OnlineOptions = field(default_factory=OnlineOptions)
    plugins: PluginsSection = field(default_factory=PluginsSection)
    source: str = DEFAULTS_SOURCE


_SECTIONS: Final = {
    "store": StoreSection,
    "fold": FoldConfig,
    "limits": Limits,
    "server": ServerSection,
    "ranking": RankingSection,
    "metrics": MetricsSection,
    "mqtt": MqttSection,
    "kafka": KafkaSection,
    "online": OnlineOptions,
    "plugins": PluginsSection,
}


def load_config(path: str | Path | None = None) -> Config:
    """
    Load ``path`` (TOML), or the embedded default when ``path`` is ``None``.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown section or key, wrong type or
            value; the message names the file and ``[section].key``.
    """
    if path is None:
        return Config()
    source = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(source, "file", f"cannot read ({e.strerror})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "file", f"not valid TOML ({e})") from e
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(
            source, f"[{unknown[0]}]", f"unknown section; known: {', '.join(sorted(_SECTIONS))}"
        )
    sections = {
        name: _section(source, name, cls, raw.get(name, {}))
        for name, cls in _SECTIONS.items() if cls is not PluginsSection
    }  # fmt: skip
    return Config(**sections, plugins=_plugins_section(source, raw.get("plugins", {})),
                  source=source)  # fmt: skip


def _plugins_section(source: str, values: Any) -> PluginsSection:
    """
    ``[plugins]``: the two lists, then one ``[plugins.<name>]`` table per plugin.

    Names are checked against the registered entry points (nothing is imported);
    the parameters are checked by the plugins themselves when the daemon builds them
    (at start, on SIGHUP, and by ``rerankd check-config``).
    """
    if not isinstance(values, dict):
        raise ConfigError(source, "[plugins]", "expected a table")
    lists: dict[str, tuple[str, ...]] = {}
    params: dict[str, Any] = {}
    for key, value in values.items():
        if key in {"privacy", "policies"}:
            try:
                lists[key] = msgspec.convert(value, tuple[str, ...])
            except msgspec.ValidationError as e:
                raise ConfigError(source, f"[plugins].{key}",
                                  f"expected a list of plugin names ({e})") from e  # fmt: skip
        elif isinstance(value, dict):
            params[key] = value
        else:
            known = "privacy, policies, and a [plugins.<name>] table per listed plugin"
            raise ConfigError(source, f"[plugins].{key}", f"unknown key; known: {known}")
    problem = _plugins_problem(lists.get("privacy", DEFAULT_PRIVACY),
                               lists.get("policies", ()), params)
    if problem is not None:
        raise ConfigError(source, *problem)
    section = PluginsSection(**lists, params=params)
    registered = REGISTRY.names()
    for kind in ("privacy", "policies"):
        for name in getattr(section, kind):
            if name not in registered:
                raise ConfigError(source, f"[plugins].{kind}", f"unknown plugin {name!r}; known "
                                  f"(entry points rerankd.plugins): {', '.join(registered)}")
    return section


def _plugins_problem(privacy: tuple[str, ...], policies: tuple[str, ...],
                     params: Mapping[str, Any]) -> tuple[str, str] | None:  # fmt: skip
    """The first structural mistake of ``[plugins]`` as (key, what is wrong), or None."""
    for kind, names in (("privacy", privacy), ("policies", policies)):
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            return f"[plugins].{kind}", f"{repeated[0]!r} is listed twice"
    both = sorted(set(privacy) & set(policies))
    if both:
        return "[plugins]", f"{both[0]!r} is listed both as a privacy plugin and as a policy"
    for name, table in params.items():
        if name not in privacy and name not in policies:
            return (f"[plugins.{name}]", ("parameters for a plugin that is not listed in "
                    "[plugins].privacy or [plugins].policies; list it or remove the table"))
        if not isinstance(table, Mapping):
            return f"[plugins.{name}]", "expected a table of parameters"
    return None


def _section(source: str, name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(source, f"[{name}]", "expected a table")
    assert is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        where = f"[{name}].{key}"
        if key not in known:
            raise ConfigError(source, where, f"unknown key; known: {', '.join(sorted(known))}")
        try:
            if hints[key] in (Path, Path | None):  # msgspec has no Path: a path is a string
                text = msgspec.convert(value, str)
                kwargs[key] = Path(text) if text or hints[key] is Path else None
                continue
            kwargs[key] = msgspec.convert(value, hints[key], strict=False)
        except msgspec.ValidationError as e:
            raise ConfigError(source, where, f"expected {_type_name(hints[key])} ({e})") from e
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(source, f"[{name}]", str(e)) from e


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
