"""
The vector refresher's scheduling (`Service.refresh_vectors`): its share of the kernel
thread, and that it gives way to ranks waiting for the batcher.

Pure scheduling logic, so the encoder is a stand-in whose refresh jobs take a known
time on the real kernel thread; the service, its batcher and the thread are real.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from daemon.config import load_config
from daemon.protocol import Rank
from daemon.service import Service, _Batcher

JOB_S = 0.01  # each refresh job holds the kernel thread this long
USERS = 80  # 10 jobs of 8


class _Job:
    """Stands in for `daemon.ranking.EncodeJob`: `run` holds the kernel thread for JOB_S."""

    def __init__(self, rows: list[int], jobs: list[tuple[float, float, int]]) -> None:
        self.rows = rows
        self._jobs = jobs

    def run(self) -> None:
        started = time.perf_counter()
        time.sleep(JOB_S)
        self._jobs.append((started, time.perf_counter(), len(self.rows)))


class _Encoder:
    """Stands in for `daemon.ranking.Ranking` where the refresher and the batcher call it."""

    def __init__(self) -> None:
        self.jobs: list[tuple[float, float, int]] = []  # (start, end, users) per refresh job
        self.stored = 0

    def refresh_job(self, rows: list[int]) -> _Job:
        return _Job(rows, self.jobs)

    def store(self, job: _Job, *, refreshed: bool = False) -> int:
        assert refreshed
        self.stored += len(job.rows)
        return len(job.rows)

    def encode_job(self, requests: list[Rank]) -> None:
        del requests

    def rank_batch(self, requests: list[Rank], *, encoded: None) -> list[None]:
        assert encoded is None
        return [None] * len(requests)


def _service(share: float) -> tuple[Service, _Encoder]:
    config = load_config(None)
    config = dataclasses.replace(
        config, ranking=dataclasses.replace(config.ranking, refresh_share=share))
    service = Service(config)
    encoder = _Encoder()
    service.ranking = encoder  # type: ignore[assignment]
    service.batcher = _Batcher(encoder, service.kernel_thread, 64,  # type: ignore[arg-type]
                               service.metrics)
    return service, encoder


async def _touch(service: Service, users: int) -> None:
    await asyncio.sleep(0)  # the refresher task sets up its wake-up event
    with service._touched_lock:  # noqa: SLF001 - what _note_touched does after a fold
        service._touched |= set(range(users))  # noqa: SLF001
    assert service._refresh_wake is not None  # noqa: SLF001
    service._refresh_wake.set()  # noqa: SLF001


async def _busy_fraction(share: float) -> float:
    service, encoder = _service(share)
    task = asyncio.create_task(service.refresh_vectors())
    try:
        await _touch(service, USERS)
        deadline = time.monotonic() + 10.0
        while sum(n for *_, n in encoder.jobs) < USERS and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
    finally:
        task.cancel()
        service.kernel_thread.shutdown()
    assert sum(n for *_, n in encoder.jobs) == encoder.stored == USERS
    busy = sum(end - start for start, end, _ in encoder.jobs)
    return busy / (encoder.jobs[-1][1] - encoder.jobs[0][0])


@pytest.mark.parametrize(("share", "low", "high"), [(0.25, 0.1, 0.3), (1.0, 0.7, 1.0)])
async def test_refresh_jobs_take_at_most_their_share_of_the_kernel_thread(
        share: float, low: float, high: float) -> None:
    """With share 0.25 the jobs rest three times as long as they ran; with 1.0 not at all."""
    assert low <= await _busy_fraction(share) <= high


async def test_refresher_waits_while_ranks_wait_for_the_batcher() -> None:
    """A rank queued at the batcher holds back every refresh job until it is answered."""
    service, encoder = _service(1.0)
    batcher = service.batcher
    assert batcher is not None
    refresher = asyncio.create_task(service.refresh_vectors())
    rank = asyncio.create_task(batcher.rank(Rank(id=1, op="rank", user="u", candidates=[])))
    try:
        await asyncio.sleep(0)  # the rank is queued; the batcher does not run yet
        await _touch(service, 8)
        await asyncio.sleep(0.1)
        assert encoder.jobs == []
        released = time.perf_counter()
        runner = asyncio.create_task(batcher.run())
        assert await asyncio.wait_for(rank, 5.0) is None
        deadline = time.monotonic() + 5.0
        while not encoder.jobs and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        runner.cancel()
    finally:
        refresher.cancel()
        service.kernel_thread.shutdown()
    assert len(encoder.jobs) == 1
    assert encoder.jobs[0][0] >= released
