"""
What a plugin may learn from the daemon that builds it: :class:`PluginContext`.

The registry passes a context to a plugin class whose constructor declares a
``context`` parameter (keyword), and only to those: most plugins need nothing but
their ``[plugins.<name>]`` table. The context carries plain values, never daemon
objects, so that plugins keep to the import direction of DESIGN.md (``plugins`` may
import ``eventstore`` and ``kernels``, never ``daemon``). One callable is the
exception, `PluginContext.build_policies`, for policies made of other policies.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plugins.base import RankingPolicy

#: ``build_policies(names, params)``: the ranking policies ``names``, built in order
#: from the registry with ``params[name]`` as each one's table.
PolicyBuilder = Callable[[Sequence[str], Mapping[str, Mapping[str, Any]]],
                         "tuple[RankingPolicy, ...]"]  # fmt: skip

__all__ = ["PluginContext", "PolicyBuilder"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginContext:
    """
    The daemon's facts a plugin may use.

    Args:
        data_dir: ``[store].data_dir``: where a plugin may keep files of its own (a
            generated key, for instance), beside the log and the snapshots.
        credentials_dir: ``$CREDENTIALS_DIRECTORY`` (systemd's ``LoadCredential=``),
            or None outside systemd.
        dry_run: the plugin is built only to check its parameters (``rerankd
            check-config``): it must not create or change any file, and it may be
            left unable to work (e.g. with no key yet).
        build_policies: builds ranking policies by name through the same registry
            (see `PolicyBuilder`), for a policy that runs policies of its own (the
            arms of ``experiment``); None where no registry is at hand. It refuses a
            policy that would contain itself.

    .. versionadded:: 0.1.0
    """

    data_dir: Path
    credentials_dir: Path | None = None
    dry_run: bool = False
    build_policies: PolicyBuilder | None = None

    @classmethod
    def from_environment(cls, data_dir: Path, *, dry_run: bool = False) -> PluginContext:
        """A context for ``data_dir`` with the credentials directory systemd set, if any."""
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        return cls(data_dir=data_dir, credentials_dir=Path(creds) if creds else None,
                   dry_run=dry_run)  # fmt: skip

    def credential(self, name: str) -> Path | None:
        """The file of systemd credential ``name``, when one was passed to the service."""
        if self.credentials_dir is None or not name:
            return None
        path = self.credentials_dir / name
        return path if path.is_file() else None
