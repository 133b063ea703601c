"""
Making sure a stop ends: tasks that miss their cancellation, and where a slow stop waits.

On SIGTERM the daemon's TaskGroup cancels its tasks and waits for all of them. A task
can miss that cancellation without any bug of ours: a library coroutine that awaits a
task it has cancelled itself, which then ends without raising (aiokafka's consumer
``stop`` awaits its heartbeat task, whose loop ends on ``CancelledError``), or Python
3.11's ``asyncio.wait_for``, which returns a result that arrived in the same turn as
the cancellation, hands the caller a normal return instead of ``CancelledError``. The
TaskGroup would then wait for that task for ever, and systemd would SIGKILL the
daemon after ``TimeoutStopSec``.

:func:`hurry` cancels such tasks again and logs each of them with the chain of
coroutines it waits in (code locations only, no data). :func:`dump_threads_later`
covers what asyncio cannot see: a thread that blocks the stop (the store's writer,
the kernel thread) gets every thread's stack written to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

import structlog

_log = structlog.get_logger("rerankd.daemon")

#: After the stop began, how often the tasks still running are named and cancelled again.
HURRY_EVERY_S: Final = 5.0
#: After the stop began, when every thread's stack is written to stderr if it has not ended.
DUMP_THREADS_AFTER_S: Final = 30.0
#: The innermost coroutines named per task in ``stopping_slow``.
_DEPTH: Final = 6


async def hurry(tasks: Sequence[asyncio.Task[Any]], *, every_s: float = HURRY_EVERY_S) -> None:
    """
    Cancel again, every ``every_s``, those of ``tasks`` still running, and log them.

    Until every task is done, each round logs ``stopping_slow`` with where each task
    waits, then cancels it again. Start it as a task of its own once the tasks were
    cancelled, and cancel it when they are done (it also returns by itself then).
    """
    waited = 0.0
    while True:
        await asyncio.sleep(every_s)
        waited += every_s
        pending = [task for task in tasks if not task.done()]
        if not pending:
            return
        _log.warning("stopping_slow", seconds=waited,
                     tasks={task.get_name(): awaiting(task) for task in pending})  # fmt: skip
        for task in pending:
            task.cancel()


def awaiting(task: asyncio.Task[Any], depth: int = _DEPTH) -> list[str]:
    """
    Where ``task`` waits: its innermost ``depth`` coroutines, outermost first.

    Each as ``file.py:line function``; ``Task.get_stack`` only gives the outermost one.
    """
    frames = [f"{Path(f.f_code.co_filename).name}:{f.f_lineno} {f.f_code.co_name}"
              for f in _await_chain(task.get_coro())]  # fmt: skip
    return frames[-depth:]


def _await_chain(awaitable: object) -> Iterator[FrameType]:
    """The suspended frames of a coroutine and of those it awaits, outermost first."""
    seen = 0
    while awaitable is not None and seen < 100:  # a cycle is impossible; a bound is cheap
        seen += 1
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "ag_frame", None)
        if frame is None:
            return
        yield frame
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "ag_await", None)


def dump_threads_later(seconds: float = DUMP_THREADS_AFTER_S) -> None:
    """
    Write every thread's stack to stderr in ``seconds``, unless :func:`cancel_dump` comes first.

    Once; the daemon goes on. For a stop that a blocked thread holds up.
    """
    with contextlib.suppress(ValueError, OSError, RuntimeError):  # no usable stderr: no dump
        faulthandler.dump_traceback_later(seconds, repeat=False, file=sys.stderr, exit=False)


def cancel_dump() -> None:
    """Cancel what :func:`dump_threads_later` armed (harmless when nothing is)."""
    faulthandler.cancel_dump_traceback_later()
