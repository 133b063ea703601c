"""
structlog set-up: JSON lines (journald collects them under systemd), readable on a tty.

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

#: Exceptions as structured tracebacks, without local variables: locals would carry
#: request contents (user ids) into the logs.
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def configure_logging(*, stream: TextIO | None = None, level: str = "info") -> None:
    """
    Route structlog to ``stream`` (default stderr), dropping levels below ``level``.

    JSON lines (with exceptions as structured tracebacks) when the stream is not a
    terminal, as under systemd; aligned, readable lines on a terminal.
    """
    out = stream or sys.stderr
    readable = out.isatty()
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=False)
        if readable
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            *([] if readable else [_TRACEBACKS]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
