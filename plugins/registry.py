"""
The plugin registry: plugins found through the entry-point group ``rerankd.plugins``.

A plugin is a class (or any callable) registered under a name in that group, by
rerankd itself for the built-ins (``pyproject.toml``) exactly as a third-party
package registers its own::

    [project.entry-points."rerankd.plugins"]
    geo_blur = "acme_rerankd.geo:GeoBlur"

The config lists names (``[plugins].privacy``, ``[plugins].policies``) and gives each
its parameters (``[plugins.<name>]``). The registry then:

- **finds lazily**: listing names reads the installed distributions' metadata only;
  a plugin's module is imported when the config names it, once per registry, so an
  installed but unused plugin costs nothing and cannot break anything. (This is also
  why tests need no switch to turn plugins off: nothing unnamed ever loads.)
- **builds**: ``cls(**params)``, plus ``context=`` (a :class:`PluginContext`) when the
  constructor declares a ``context`` parameter. Keys the constructor does not take are
  refused before it runs, naming ``[plugins.<name>].<key>``; a plugin checks its own
  values and raises :class:`PluginError` naming the key.
- **checks the kind**: what is listed under ``privacy`` must satisfy
  :class:`PrivacyPlugin`, what is under ``policies`` :class:`RankingPolicy`.

Every failure is a :class:`PluginError` naming the plugin (and its entry point when
it failed to load), which stops the daemon's start or a reload.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Final, Literal

from eventstore.schema import Event
from plugins.base import PluginError, PrivacyPlugin, RankingPolicy
from plugins.context import PluginContext

__all__ = [
    "ENTRY_POINT_GROUP",
    "REGISTRY",
    "PluginInfo",
    "PrivacyChain",
    "Registry",
]

#: The entry-point group plugins are registered in.
ENTRY_POINT_GROUP: Final = "rerankd.plugins"
Kind = Literal["privacy", "policies"]
_PROTOCOLS: Final[dict[str, tuple[type, str]]] = {
    "privacy": (PrivacyPlugin, "a privacy plugin (name, ingest, user_id, export)"),
    "policies": (RankingPolicy, "a ranking policy (name, apply)"),
}
_RESERVED: Final = frozenset({"context"})


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One registered plugin, as ``rerankd plugins`` lists it (nothing imported)."""

    name: str
    value: str  # "module:attr"
    distribution: str


class PrivacyChain:
    """
    The configured privacy plugins, run in order; itself shaped like one.

    ``ingest`` hands each plugin what the previous one returned; ``user_id`` maps an
    id through every plugin in order, as ``ingest`` maps an event's ``user``.
    """

    name = "privacy"

    def __init__(self, plugins: Sequence[PrivacyPlugin] = ()) -> None:
        self.plugins = tuple(plugins)

    @property
    def names(self) -> list[str]:
        """The plugins' names, in order."""
        return [p.name for p in self.plugins]

    def ingest(self, events: Sequence[Event]) -> list[Event]:
        """The events to store: through every plugin in order."""
        out = list(events)
        for plugin in self.plugins:
            if not out:
                break
            out = plugin.ingest(out)
        return out

    def user_id(self, user: str) -> str:
        """The id ``user`` is stored under."""
        for plugin in self.plugins:
            user = plugin.user_id(user)
        return user

    def export(self, aggregates: Mapping[str, Any]) -> dict[str, Any]:
        """``aggregates`` as they may leave the daemon."""
        out = dict(aggregates)
        for plugin in self.plugins:
            out = plugin.export(out)
        return out


class Registry:
    """
    Plugins registered in the entry-point group ``group``.

    Entry points are read on first use; a plugin's class is imported the first time it
    is built and kept for later builds (a SIGHUP reload builds again, it does not
    import again).
    """

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        self.group = group
        self._entry_points: dict[str, list[EntryPoint]] | None = None
        self._loaded: dict[str, Any] = {}

    def _points(self) -> dict[str, list[EntryPoint]]:
        if self._entry_points is None:
            found: dict[str, list[EntryPoint]] = {}
            for point in entry_points(group=self.group):
                found.setdefault(point.name, []).append(point)
            self._entry_points = found
        return self._entry_points

    def names(self) -> list[str]:
        """Every registered name, sorted (nothing is imported)."""
        return sorted(self._points())

    def info(self) -> list[PluginInfo]:
        """Every registered plugin with its entry point and distribution."""
        return [
            PluginInfo(p.name, p.value, p.dist.name if p.dist else "?")
            for name in self.names() for p in self._points()[name]
        ]  # fmt: skip

    def entry_point(self, name: str) -> EntryPoint:
        """
        The entry point registered as ``name``.

        Raises:
            PluginError: no plugin has that name, or two distributions register it.
        """
        points = self._points().get(name)
        if not points:
            known = ", ".join(self.names()) or "none"
            msg = (
                f"unknown plugin {name!r}: no entry point of that name in group "
                f"{self.group!r}; known: {known}"
            )
            raise PluginError(msg)
        if len(points) > 1:
            dists = ", ".join(sorted(p.dist.name if p.dist else "?" for p in points))
            msg = (
                f"plugin {name!r} is registered by several distributions ({dists}); "
                "uninstall all but one"
            )
            raise PluginError(msg)
        return points[0]

    def load(self, name: str) -> Any:
        """
        The class (callable) registered as ``name``, imported once.

        Raises:
            PluginError: unknown name, or the entry point failed to import; the message
                names the plugin and its entry point.
        """
        if name in self._loaded:
            return self._loaded[name]
        point = self.entry_point(name)
        try:
            factory = point.load()
        except Exception as e:  # any import failure is the plugin's: report it, chained
            msg = (f"plugin {name!r} (entry point {point.value} in group {self.group!r}) failed "
                   f"to load: {type(e).__name__}: {e}")  # fmt: skip
            raise PluginError(msg) from e
        if not callable(factory):
            msg = f"plugin {name!r} (entry point {point.value}) is not a class or callable"
            raise PluginError(msg)
        self._loaded[name] = factory
        return factory

    def build(self, name: str, params: Mapping[str, Any], *, kind: Kind,
              context: PluginContext) -> Any:  # fmt: skip
        """
        Build plugin ``name`` with its ``[plugins.<name>]`` table and check its kind.

        Raises:
            PluginError: it cannot be loaded, a parameter is unknown or bad (naming
                ``[plugins.<name>].<key>``), or it is not of ``kind``.
        """
        factory = self.load(name)
        kwargs = _arguments(name, factory, params, context)
        try:
            plugin = factory(**kwargs)
        except PluginError:
            raise
        except (TypeError, ValueError) as e:
            msg = f"[plugins.{name}]: {type(e).__name__}: {e}"
            raise PluginError(msg) from e
        except Exception as e:  # a plugin's failure to start stops the start, chained
            msg = f"[plugins.{name}]: failed to start: {type(e).__name__}: {e}"
            raise PluginError(msg) from e
        protocol, what = _PROTOCOLS[kind]
        if not isinstance(plugin, protocol):
            point = self.entry_point(name)
            msg = f"[plugins].{kind}: {name!r} ({point.value}) is not {what}"
            raise PluginError(msg)
        return plugin

    def privacy_chain(self, names: Sequence[str], params: Mapping[str, Mapping[str, Any]],
                      *, context: PluginContext) -> PrivacyChain:  # fmt: skip
        """The privacy plugins ``names``, built in order, as one chain."""
        return PrivacyChain([self.build(n, params.get(n, {}), kind="privacy", context=context)
                             for n in names])  # fmt: skip

    def policies(self, names: Sequence[str], params: Mapping[str, Mapping[str, Any]],
                 *, context: PluginContext, within: tuple[str, ...] = ()
                 ) -> tuple[RankingPolicy, ...]:  # fmt: skip
        """
        The ranking policies ``names``, built in order.

        Each gets a context whose ``build_policies`` builds policies of its own through
        this registry; ``within`` names the policies being built around them, and a
        policy that would contain itself is refused.
        """
        built = []
        for name in names:
            if name in within:
                path = " -> ".join((*within, name))
                msg = f"[plugins.{within[-1]}]: policy {name!r} would contain itself ({path})"
                raise PluginError(msg)
            inner = (*within, name)

            def nested(inner_names: Sequence[str], inner_params: Mapping[str, Mapping[str, Any]],
                       inner: tuple[str, ...] = inner) -> tuple[RankingPolicy, ...]:  # fmt: skip
                return self.policies(inner_names, inner_params, context=context, within=inner)

            built.append(self.build(name, params.get(name, {}), kind="policies",
                                    context=replace(context, build_policies=nested)))  # fmt: skip
        return tuple(built)

    def defaults(self, name: str) -> dict[str, Any]:
        """
        The parameters plugin ``name`` takes, with their defaults.

        Read from its constructor's signature, ``context`` left out; ``...`` marks a
        parameter without a default.
        """
        out: dict[str, Any] = {}
        for param in _parameters(self.load(name)):
            if param.name in _RESERVED or param.kind in _VARIADIC:
                continue
            out[param.name] = ... if param.default is param.empty else param.default
        return out


_VARIADIC: Final = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _parameters(factory: Any) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: take anything
        return [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]


def _arguments(name: str, factory: Any, params: Mapping[str, Any],
               context: PluginContext) -> dict[str, Any]:  # fmt: skip
    """The keyword arguments for ``factory``: ``params``, checked, plus ``context`` if taken."""
    parameters = {p.name: p for p in _parameters(factory)}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    known = sorted(n for n, p in parameters.items()
                   if n not in _RESERVED and p.kind not in _VARIADIC)  # fmt: skip
    for key in params:
        if key in _RESERVED or (not takes_any and key not in known):
            msg = f"[plugins.{name}].{key}: unknown key; known: {', '.join(known) or 'none'}"
            raise PluginError(msg)
    kwargs = dict(params)
    if "context" in parameters:
        kwargs["context"] = context
    return kwargs


#: The registry of the installed distributions' entry points (what the daemon uses).
REGISTRY: Final = Registry()
