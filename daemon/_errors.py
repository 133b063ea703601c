"""
The daemon's exceptions: one root, one family per layer (STYLE.md section 6).

``eventstore`` has its own root (it imports nothing of ours); the daemon translates
its errors at the boundary, keeping the original as ``__cause__``.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DaemonError", "PluginError", "ScoringError"]


class DaemonError(Exception):
    """Root of every error the daemon raises on purpose."""


class ConfigError(DaemonError):
    """
    A configuration file or value is wrong.

    Args:
        source: the file (or ``"<defaults>"``).
        key: ``[section].key``.
        problem: what is wrong and how to fix it.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{source}: {key}: {problem}")


class PluginError(DaemonError):
    """A plugin failed to load or to run."""


class ScoringError(DaemonError):
    """A kernel call failed."""
