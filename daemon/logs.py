"""
structlog set-up: JSON lines, one per event (journald collects them under systemd).

The processor chain is the style's: contextvars, level, ISO timestamp, renderer.
CLI commands log to stderr so their stdout stays the command's output; the daemon
logs to stdout.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

__all__ = ["configure_logging"]


def configure_logging(*, stream: TextIO | None = None, level: str = "info") -> None:
    """Route structlog to ``stream`` (default stderr) as JSON, dropping levels below ``level``."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
