"""
structlog set-up: JSON lines (journald collects them under systemd), readable on a tty.

The processor chain is the style's: contextvars, level, ISO timestamp, renderer.
CLI commands log to stderr so their stdout stays the command's output; the daemon
logs to stdout.

The broker clients (aiokafka, aiomqtt's paho) log through the standard library; their
records go through the same renderer (so journald still gets JSON lines), from
WARNING up, and each distinct message at most once per :data:`LIBRARY_REPEAT_S`:
while a broker is down aiokafka repeats the same connection error many times a
second, and the feed's own ``kafka_error``/``mqtt_disconnected`` lines already say it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Final, TextIO

import structlog

__all__ = ["LIBRARY_REPEAT_S", "configure_logging"]

#: The least time between two records of the same library message.
LIBRARY_REPEAT_S: Final = 30.0

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
    chain: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
        *([] if readable else [_TRACEBACKS]),
    ]
    _route_stdlib(out, chain, renderer)
    structlog.configure(
        processors=[*chain, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )


def _route_stdlib(out: TextIO, chain: list[structlog.typing.Processor],
                  renderer: structlog.typing.Processor) -> None:  # fmt: skip
    """Render the standard library's records (WARNING and up) like structlog's own."""
    handler = logging.StreamHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *chain],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))  # fmt: skip
    handler.addFilter(_Repeats(LIBRARY_REPEAT_S))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "rerankd", False)]:
        root.removeHandler(old)
    handler.rerankd = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


class _Repeats(logging.Filter):
    """Let each (logger, message template) through at most once per ``every_s``."""

    def __init__(self, every_s: float) -> None:
        super().__init__()
        self._every_s = every_s
        self._last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._every_s:
            return False
        if len(self._last) > 1000:  # many distinct messages: forget the old ones
            self._last.clear()
        self._last[key] = now
        return True
