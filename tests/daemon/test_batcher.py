"""
The rank batcher's pipeline (`daemon.service._Batcher`): a batch's encode runs on the
kernel thread while the loop ranks the next batch, and a failed encode fails its own
batch only.

Pure scheduling logic, so the ranking is a stand-in whose encodes take a known time on
a real kernel thread; the batcher, its loop and the thread are real.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from daemon.metrics import Metrics
from daemon.protocol import Rank
from daemon.service import _Batcher

ENCODE_S = 0.2


class _Job:
    def __init__(self, user: str, log: list[str]) -> None:
        self.user = user
        self._log = log

    def run(self) -> None:
        time.sleep(ENCODE_S)
        if self.user == "broken":
            msg = "kernel failed"
            raise RuntimeError(msg)
        self._log.append(f"encoded {self.user}")


class _Ranking:
    """Users named "slow..." and "broken" need an encode; the others are cached."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def encode_job(self, requests: list[Rank]) -> _Job | None:
        users = [r.user for r in requests if r.user.startswith(("slow", "broken"))]
        return _Job(users[0], self.log) if users else None

    def store(self, job: _Job) -> int:
        self.log.append(f"stored {job.user}")
        return 1

    def rank_batch(self, requests: list[Rank], *, encoded: _Job | None) -> list[str]:
        self.log.append(f"ranked {[r.user for r in requests]}")
        return [f"{r.user} encoded={encoded is not None}" for r in requests]


def _rank(user: str) -> Rank:
    return Rank(user=user, candidates=["a"])


async def test_a_cached_batch_is_answered_while_the_one_before_it_encodes() -> None:
    """The second batch needs no encode: it is answered long before the first."""
    ranking = _Ranking()
    with ThreadPoolExecutor(1) as kernel:
        batcher = _Batcher(ranking, kernel, 64, Metrics())  # type: ignore[arg-type]
        runner = asyncio.create_task(batcher.run())
        try:
            slow = asyncio.create_task(batcher.rank(_rank("slow")))
            await asyncio.sleep(0.02)  # the first batch is encoding
            started = time.perf_counter()
            cached = await asyncio.wait_for(batcher.rank(_rank("cached")), 5.0)
            cached_s = time.perf_counter() - started
            assert not slow.done()
            assert await asyncio.wait_for(slow, 5.0) == "slow encoded=True"
        finally:
            runner.cancel()
    assert cached == "cached encoded=False"
    assert cached_s < ENCODE_S / 2
    assert ranking.log == ["ranked ['cached']", "encoded slow", "stored slow", "ranked ['slow']"]
    assert not batcher.busy


async def test_a_failed_encode_fails_its_batch_and_the_batcher_goes_on() -> None:
    """The kernel's error reaches the requests of that batch; the next batch is answered."""
    ranking = _Ranking()
    with ThreadPoolExecutor(1) as kernel:
        batcher = _Batcher(ranking, kernel, 64, Metrics())  # type: ignore[arg-type]
        runner = asyncio.create_task(batcher.run())
        try:
            broken = asyncio.create_task(batcher.rank(_rank("broken")))
            await asyncio.sleep(0.02)
            slow = asyncio.create_task(batcher.rank(_rank("slow-2")))
            outcomes = await asyncio.wait_for(
                asyncio.gather(broken, slow, return_exceptions=True), 5.0)
        finally:
            runner.cancel()
    assert isinstance(outcomes[0], RuntimeError)
    assert str(outcomes[0]) == "kernel failed"
    assert outcomes[1] == "slow-2 encoded=True"
    assert not batcher.busy
