"""A stop ends even when a task misses its cancellation (daemon._stopping, feeds.sink)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from structlog.testing import capture_logs

from daemon._stopping import awaiting, hurry
from daemon.feeds.sink import raise_if_cancelling


async def _stubborn(swallow: int) -> None:
    """Miss the first ``swallow`` cancellations (as a library's cleanup can), then end on one."""
    for _ in range(swallow):
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
    await _deep_wait()


async def _deep_wait() -> None:
    await asyncio.sleep(3600)


class _Stop(Exception):  # noqa: N818
    pass


async def _group(
    swallow: int, *, hurry_every_s: float | None, tasks: list[asyncio.Task[None]] | None = None
) -> list[dict[str, object]]:
    """A TaskGroup ended by an error while one task misses ``swallow`` cancellations."""
    tasks = [] if tasks is None else tasks
    hurrying: list[asyncio.Task[None]] = []

    async def stop() -> None:
        await asyncio.sleep(0.01)
        if hurry_every_s is not None:
            hurrying.append(asyncio.create_task(hurry(tasks, every_s=hurry_every_s)))
        raise _Stop

    with capture_logs() as logs:
        try:
            async with asyncio.TaskGroup() as tg:
                tasks.append(tg.create_task(_stubborn(swallow), name="daemon[test].stubborn"))
                tasks.append(tg.create_task(asyncio.sleep(3600), name="daemon[test].plain"))
                tasks.append(tg.create_task(stop(), name="daemon[test].stop"))
        except* _Stop:
            pass
        finally:
            for task in hurrying:
                task.cancel()
    assert all(task.done() for task in tasks)
    return logs


async def test_a_task_that_misses_its_cancellation_is_cancelled_again_and_named() -> None:
    t0 = time.monotonic()
    logs = await _group(swallow=2, hurry_every_s=0.05)
    assert time.monotonic() - t0 < 5.0
    slow = [entry for entry in logs if entry["event"] == "stopping_slow"]
    # the TaskGroup's cancellation was missed once, the first re-cancellation too
    assert len(slow) == 2
    assert slow[0]["seconds"] == pytest.approx(0.05)
    tasks = slow[0]["tasks"]
    assert isinstance(tasks, dict)
    assert list(tasks) == ["daemon[test].stubborn"]  # only the one still running
    (where,) = tasks.values()
    assert where[-2].startswith("test_stopping.py:")
    assert [frame.split(" ")[-1] for frame in where] == ["_stubborn", "sleep"]
    # the second time it waits one coroutine deeper, and that shows
    again = slow[1]["tasks"]["daemon[test].stubborn"]
    assert [frame.split(" ")[-1] for frame in again] == ["_stubborn", "_deep_wait", "sleep"]


async def test_without_hurry_the_group_would_wait_for_ever() -> None:
    """
    The failure ``hurry`` guards against is real: the TaskGroup alone does not end,
    and cancelling the task that waits for it does not end it either.
    """
    tasks: list[asyncio.Task[None]] = []
    group = asyncio.create_task(_group(swallow=1, hurry_every_s=None, tasks=tasks))
    done, _ = await asyncio.wait([group], timeout=0.5)
    assert not done
    group.cancel()
    done, _ = await asyncio.wait([group], timeout=0.5)
    assert not done
    tasks[0].cancel()  # by hand, what hurry does
    await asyncio.wait_for(asyncio.gather(group, return_exceptions=True), timeout=5)
    assert group.done()


async def test_hurry_ends_by_itself_once_the_tasks_are_done() -> None:
    tasks = [asyncio.create_task(asyncio.sleep(0.01))]
    with capture_logs() as logs:
        await asyncio.wait_for(hurry(tasks, every_s=0.05), timeout=5)
    assert [entry for entry in logs if entry["event"] == "stopping_slow"] == []


async def test_awaiting_walks_the_chain_of_coroutines() -> None:
    task = asyncio.create_task(_stubborn(0))
    await asyncio.sleep(0)
    names = [frame.split(" ")[-1] for frame in awaiting(task)]
    assert names == ["_stubborn", "_deep_wait", "sleep"]
    assert [frame.split(" ")[-1] for frame in awaiting(task, depth=1)] == ["sleep"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_raise_if_cancelling_raises_in_a_task_that_carries_on_after_a_cancel() -> None:
    reached: list[str] = []

    async def carries_on() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            reached.append("swallowed")
        raise_if_cancelling()
        reached.append("carried on")

    task = asyncio.create_task(carries_on())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reached == ["swallowed"]


async def test_raise_if_cancelling_is_silent_in_a_task_that_was_not_cancelled() -> None:
    async def fine() -> str:
        raise_if_cancelling()
        return "ok"

    assert await asyncio.create_task(fine()) == "ok"
