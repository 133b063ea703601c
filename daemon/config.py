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
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Final

import msgspec

from daemon._errors import ConfigError
from eventstore import FoldConfig, Limits

__all__ = ["Config", "StoreSection", "load_config"]

DEFAULTS_SOURCE: Final = "<defaults>"


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSection:
    """
    ``[store]``: where and how events are kept.

    Args:
        data_dir: holds ``events.db`` and ``snapshots/`` (relative to the working directory).
        synchronous: SQLite durability; ``FULL`` (default) means an acknowledged event is on disk.
        snapshot_every_events: write a snapshot after this many new events.
        keep_snapshots: snapshot files kept.
    """

    data_dir: Path = Path("var")
    synchronous: str = "FULL"
    snapshot_every_events: int = 100_000
    keep_snapshots: int = 2

    def __post_init__(self) -> None:
        if self.synchronous not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            msg = f"expected OFF, NORMAL, FULL or EXTRA, got {self.synchronous!r}"
            raise ValueError(msg)
        if self.snapshot_every_events < 0 or self.keep_snapshots < 1:
            msg = "snapshot_every_events must be >= 0 and keep_snapshots >= 1"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration; ``source`` names the file it came from."""

    store: StoreSection = field(default_factory=StoreSection)
    fold: FoldConfig = field(default_factory=FoldConfig)
    limits: Limits = field(default_factory=Limits)
    source: str = DEFAULTS_SOURCE


_SECTIONS: Final = {"store": StoreSection, "fold": FoldConfig, "limits": Limits}


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
        raise ConfigError(source, f"[{unknown[0]}]",
                          f"unknown section; known: {', '.join(sorted(_SECTIONS))}")
    sections = {name: _section(source, name, cls, raw.get(name, {}))
                for name, cls in _SECTIONS.items()}
    return Config(**sections, source=source)


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
            if hints[key] is Path:  # msgspec has no Path type: a path is a string
                kwargs[key] = Path(msgspec.convert(value, str))
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
