"""
The rank batcher (`daemon.service._Batcher`): a batch's encode runs on the kernel
thread, the batch is ranked and answered, and a failed encode fails its own batch only.

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
